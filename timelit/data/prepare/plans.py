"""The plans of `timelit data prepare`: the shards of every split, their state on disk, and the index written last.

A rerun skips every shard whose final file exists and writes the rest; the index is written last, from all shards,
so a split without an index is "not prepared" rather than half there. The plan file `<split>.prepare.json` holds a
fingerprint of the records and settings; a rerun with a different source or settings refuses to mix old and new
shards unless `--overwrite` is given. docs/ARCHITECTURE.md ("Preparing data") tells the whole story.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from timelit.data.manifest import DatasetManifest
from timelit.data.prepare.records import SplitListing
from timelit.data.prepare.shard_jobs import BadImages, ShardJob, ShardScan, run_shard_job
from timelit.data.shards import ShardIndex, index_path, shard_name
from timelit.utilities.atomic import replace_with, write_text

log = logging.getLogger(__name__)

PLAN_FORMAT = "timelit-prepare/1"
PLAN_SUFFIX = ".prepare.json"
SKIPPED_SUFFIX = ".skipped.tsv"


def plan_path(directory: Path, split: str) -> Path:
    return directory / f"{split}{PLAN_SUFFIX}"


@dataclass
class SplitPlan:
    """Everything needed to prepare one split, and its state on disk."""

    dataset: str
    kind: Literal["dataset", "pool"]
    split: str
    directory: Path
    jobs: list[ShardJob]
    expected: int | None
    fingerprint: str
    origin: str
    notes: list[str] = field(default_factory=list)
    owns_shards: bool = True  # False for a pool indexed in place: its tar files belong to the user
    state: Literal["fresh", "resume", "done"] = "fresh"

    @property
    def shard_names(self) -> list[str]:
        return [job.name for job in self.jobs]

    @property
    def planned_samples(self) -> int | None:
        return sum(len(job.records) for job in self.jobs) if self.kind == "dataset" else None

    def plan_record(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "dataset": self.dataset,
            "split": self.split,
            "fingerprint": self.fingerprint,
            "num_shards": len(self.jobs),
            "num_samples": self.planned_samples,
            "origin": self.origin,
            "notes": self.notes,
        }


@dataclass
class SplitResult:
    """One row of the prepare summary."""

    dataset: str
    split: str
    samples: int | None
    expected: int | None
    shards: int
    written: int
    status: str
    notes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    report: Path | None = None


def plan_fingerprint(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def dataset_plan(
    manifest: DatasetManifest,
    split: str,
    listing: SplitListing,
    data_root: Path,
    samples_per_shard: int,
    resize: int | None,
) -> SplitPlan:
    directory = data_root / manifest.name
    records = listing.records
    jobs = [
        ShardJob(
            dataset=manifest.name,
            split=split,
            directory=str(directory),
            name=shard_name(split, number),
            first=start,
            records=tuple(records[start : start + samples_per_shard]),
            resize=resize,
        )
        for number, start in enumerate(range(0, len(records), samples_per_shard))
    ]
    fingerprint = plan_fingerprint(
        {
            "format": PLAN_FORMAT,
            "dataset": manifest.name,
            "split": split,
            "samples_per_shard": samples_per_shard,
            "resize": resize,
            "records": [(r.ref, r.label, r.classname, r.captions) for r in records],
        }
    )
    split_info = manifest.splits.get(split)
    expected = split_info.num_samples if split_info is not None else None
    return SplitPlan(
        manifest.name, "dataset", split, directory, jobs, expected, fingerprint, listing.origin, listing.notes
    )


def _own_files(plan: SplitPlan) -> list[Path]:
    if not plan.directory.is_dir():
        return []
    files = [index_path(plan.directory, plan.split), plan_path(plan.directory, plan.split)]
    if plan.owns_shards:
        files += sorted(plan.directory.glob(f"{plan.split}-*.tar")) + sorted(plan.directory.glob(f"{plan.split}-*.tmp"))
    return [f for f in files if f.exists()]


def settle_state(plan: SplitPlan, overwrite: bool) -> tuple[list[Path], str | None]:
    """Decide fresh / resume / done from what is on disk, without touching it.

    Returns the files a fresh start must remove first, and a conflict message when those are shards of another
    source or settings and `overwrite` is not set.
    """
    recorded = plan_path(plan.directory, plan.split)
    previous = None
    if recorded.is_file():
        try:
            previous = json.loads(recorded.read_text()).get("fingerprint")
        except (ValueError, AttributeError):
            previous = None
    if previous == plan.fingerprint:
        complete = index_path(plan.directory, plan.split).is_file() and all(j.path.is_file() for j in plan.jobs)
        plan.state = "done" if complete else "resume"
        return [], None
    plan.state = "fresh"
    leftovers = _own_files(plan)
    if leftovers and plan.owns_shards and not overwrite:
        if previous:
            why = "was prepared from a different source or with other settings"
        else:
            why = "holds shards that no prepare plan describes (written by another tool?)"
        return leftovers, f"{plan.dataset}/{plan.split}: {plan.directory} {why}; --overwrite replaces its files"
    return leftovers, None


def _write_plan(plan: SplitPlan, **extra: object) -> None:
    target = plan_path(plan.directory, plan.split)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({**plan.plan_record(), **extra}, indent=1, ensure_ascii=False))
    replace_with(tmp, target)


def _start(plan: SplitPlan) -> None:
    plan.directory.mkdir(parents=True, exist_ok=True)
    index_path(plan.directory, plan.split).unlink(missing_ok=True)  # the index is written last, from all shards
    _write_plan(plan)


def skipped_path(directory: Path, split: str) -> Path:
    """The report of the bad images a prepare with `--skip_bad true` left out: one `source<TAB>reason` line each."""
    return directory / f"{split}{SKIPPED_SUFFIX}"


def read_plan(directory: Path, split: str) -> dict:
    """The plan file of a prepared split, {} when there is none or it does not parse."""
    try:
        record = json.loads(plan_path(directory, split).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _key_order(scans: list[ShardScan]) -> np.ndarray:
    """Positions of the samples sorted by key (ties: shard, then place in it). img2dataset writes each shard's
    members in the order their downloads finished, so two downloads of one URL list hold the same samples in
    different orders; an index in key order reads them identically, and the run's figures stay the same."""
    keys = [key for scan in scans for key in scan.keys]
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


def _finish(plan: SplitPlan, scans: list[ShardScan]) -> tuple[int, list[str], list[str], list[tuple[str, str]]]:
    """Write the index from the shard scans and the report of skipped images; return the sample count, problems,
    warnings and the skipped images."""
    scans = sorted(scans, key=lambda s: s.number)
    problems, warnings = [], []
    skipped = [bad for scan in scans for bad in scan.bad]
    if plan.kind == "dataset":
        for scan, job in zip(scans, plan.jobs):
            if len(scan.offset) != len(job.records) - len(scan.bad):
                problems.append(
                    f"{plan.dataset}/{plan.split}: shard {job.path} holds {len(scan.offset)} samples, expected "
                    f"{len(job.records) - len(scan.bad)}; delete it and run prepare again"
                )
    index = ShardIndex(
        directory=plan.directory,
        split=plan.split,
        shards=plan.shard_names,
        shard=np.concatenate([np.full(len(s.offset), s.number, dtype=np.int32) for s in scans]),
        offset=np.concatenate([s.offset for s in scans]).astype(np.int64),
        length=np.concatenate([s.length for s in scans]).astype(np.int64),
        label=np.concatenate([s.label for s in scans]).astype(np.int32),
    )
    if plan.kind == "pool":
        order = _key_order(scans)
        index.shard, index.offset = index.shard[order], index.offset[order]
        index.length, index.label = index.length[order], index.label[order]
    if not problems:
        report = skipped_path(plan.directory, plan.split)
        if skipped:
            write_text(report, "".join(f"{source}\t{reason}\n" for source, reason in skipped))
        else:
            report.unlink(missing_ok=True)
        _write_plan(plan, skipped=len(skipped))
        _readable_like_shards(index.save())
        if plan.owns_shards:
            for leftover in plan.directory.glob(f"{plan.split}-*.tmp"):  # of writers killed mid-shard
                leftover.unlink(missing_ok=True)
    count = len(index)
    if plan.expected is not None and count + len(skipped) != plan.expected:
        found = f"{count} samples" + (f" (+ {len(skipped)} bad ones skipped)" if skipped else "")
        message = f"{plan.dataset}/{plan.split}: {found}, the manifest states {plan.expected}"
        if plan.kind == "pool":  # every img2dataset download loses a different set of dead links
            warnings.append(message)
        else:
            problems.append(message)
    return count, problems, warnings, skipped


def _readable_like_shards(path: Path) -> None:
    """safetensors writes files readable by their owner only (mode 0600, whatever the umask); a shared data root
    needs the index as readable as the shards beside it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _execute(plans: list[SplitPlan], workers: int) -> Iterator[tuple[SplitPlan, ShardJob, ShardScan | Exception]]:
    """Run every shard job of every plan, yielding results as they finish."""
    jobs = [(plan, number, job) for plan in plans for number, job in enumerate(plan.jobs)]
    if workers <= 1:
        for plan, number, job in jobs:
            try:
                yield plan, job, run_shard_job(number, job)
            except Exception as error:
                yield plan, job, error
        return
    executor = ProcessPoolExecutor(max_workers=workers)
    try:
        futures: dict[Future, tuple[SplitPlan, ShardJob]] = {
            executor.submit(run_shard_job, number, job): (plan, job) for plan, number, job in jobs
        }
        for future in as_completed(futures):
            error = future.exception()
            yield *futures[future], (error if error is not None else future.result())
    finally:
        # On Ctrl-C (or any error here) drop the queued shards instead of waiting for all of them; finished shards
        # are complete files and a rerun continues from them.
        executor.shutdown(wait=True, cancel_futures=True)


def _skipped_note(count: int, report: Path) -> str:
    return f"{count} bad image(s) skipped, listed in {report}"


def run_plans(plans: list[SplitPlan], workers: int, progress: bool = True) -> tuple[list[SplitResult], list[str]]:
    """Prepare every plan (skipping done ones); returns the summary rows and the problems."""
    from tqdm import tqdm

    results: list[SplitResult] = []
    problems: list[str] = []
    active = [plan for plan in plans if plan.state != "done"]
    for plan in plans:
        if plan.state == "done":
            index = ShardIndex.load(plan.directory, plan.split)
            skipped = int(read_plan(plan.directory, plan.split).get("skipped") or 0)
            report = skipped_path(plan.directory, plan.split)
            notes = [_skipped_note(skipped, report)] if skipped else []
            results.append(
                SplitResult(plan.dataset, plan.split, len(index), plan.expected, len(plan.jobs), 0, "up to date", notes)
            )
    for plan in active:
        _start(plan)
    scans: dict[int, list[ShardScan]] = {id(plan): [] for plan in active}
    failures: dict[int, list[str]] = {id(plan): [] for plan in active}
    # Progress in images where their number is known (datasets), in shards for pools.
    size = {id(job): len(job.records) or 1 for plan in active for job in plan.jobs}
    unit = "image" if all(plan.kind == "dataset" for plan in active) else "shard"
    total = sum(size.values())
    bar = tqdm(total=total, unit=unit, desc="prepare", disable=not progress or total == 0, dynamic_ncols=True)
    for plan, job, outcome in _execute(active, workers):
        bar.update(size[id(job)])
        if isinstance(outcome, BadImages):
            where = f"{plan.dataset}/{plan.split}"
            failures[id(plan)] += [f"{where}: bad image {source}: {reason}" for source, reason in outcome.bad]
            continue
        if isinstance(outcome, Exception):
            failures[id(plan)].append(str(outcome))
            continue
        scans[id(plan)].append(outcome)
        bar.set_postfix_str(f"{plan.dataset}/{plan.split}", refresh=False)
        if len(scans[id(plan)]) < len(plan.jobs) or failures[id(plan)]:
            continue
        count, split_problems, warnings, skipped = _finish(plan, scans[id(plan)])
        problems += split_problems
        for message in warnings:
            log.warning(message)
        status = "failed" if split_problems else ("resumed" if plan.state == "resume" else "prepared")
        report = skipped_path(plan.directory, plan.split) if skipped else None
        notes = plan.notes + warnings + ([_skipped_note(len(skipped), report)] if report else [])
        shards_written = sum(s.written for s in scans[id(plan)])
        results.append(
            SplitResult(
                plan.dataset,
                plan.split,
                count,
                plan.expected,
                len(plan.jobs),
                shards_written,
                status,
                notes,
                skipped,
                report,
            )
        )
    bar.close()
    for plan in active:
        if failures[id(plan)]:
            problems += failures[id(plan)]
            results.append(
                SplitResult(plan.dataset, plan.split, None, plan.expected, len(plan.jobs), 0, "failed", plan.notes)
            )
    return results, problems
