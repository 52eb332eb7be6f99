"""`timelit data prepare`: turn a downloaded dataset folder into timelit shards, in parallel and resumably.

    timelit data prepare --source /data/fomo_in_flux --metadata_dir fomo_in_flux/data_lib/00_info --data_root /data/tl
    timelit data prepare --layout imagefolder --source ~/pets --datasets [OXFORDPETS] --data_root /data/tl
    timelit data prepare --layout csv --source ~/coco/test.csv --datasets [MSCOCO] --splits [test] --data_root /data/tl
    timelit data prepare --layout pool --source ./data/laion400m/shards --datasets [LAION400M] --data_root /data/tl

Output: `<data_root>/<NAME>/<split>-NNNNNN.tar` + `<split>.index.safetensors` (the format of `timelit.data.shards`,
the same one `ShardWriter` writes) and `<split>.prepare.json`, the plan of the split.

How a prepare survives being killed. The records of a split come in a deterministic order (`timelit.data.layouts`)
and shard k always holds records [k*S, (k+1)*S), so each shard is an independent job: a worker process writes it
under a temporary name and renames it when complete, then scans it for the index. A rerun skips every shard whose
final file exists and writes the rest; the index is written last, from all shards, so a split without an index is
"not prepared" rather than half there. The plan file holds a fingerprint of the records and settings; a rerun with a
different source or settings refuses to mix old and new shards unless `--overwrite` is given.

Every image is decoded once, in the worker that writes its shard (`--decode false` skips this): a file that does
not decode stops the split with its source path and the reason, all such files listed at once, and no shard holding
it is written; with `--skip_bad true` it is left out instead and listed in `<split>.skipped.tsv` (source, reason),
in the summary and in the plan file, whose count `verify` then adds to the samples it finds. Found here, a bad file
cannot stop a run hours later, and the loaders never skip data that the user did not see reported.

Pools are indexed in key order, not in the order of their tar members: img2dataset writes each shard's members in
the order its downloads finished, so two downloads of one URL list differ in order only, and an index in key order
gives both the same samples in the same order (and a run the same figures). Their tar files are not rewritten.

Images are stored as they are (jpg/png/webp bytes), not re-encoded, unless `--resize` asks for a smaller copy or
the file is in a format webdataset readers do not expect (bmp, ppm, gif, tiff: stored as lossless PNG). Labels are
the index in the manifest's class list. Pretraining pools from img2dataset are indexed in place (no copy); shard URLs
or brace patterns readable by webdataset's `gopen` (`https://.../{00000..00139}.tar`, `pipe:...`) are copied into
local shards first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from timelit.atomic import replace_with, write_text
from timelit.data.layouts import (
    LayoutError,
    Record,
    ReleaseImages,
    SplitListing,
    Variant,
    csv_records,
    imagefolder_records,
    release_folder,
    release_records,
)
from timelit.data.manifest import DatasetManifest, ManifestSet, PoolManifest, load_manifests, names
from timelit.data.samples import decode as decode_sample
from timelit.data.samples import decode_image, describe, image_error, source_of
from timelit.data.shards import (
    IMAGE_EXTENSIONS,
    CorruptSampleError,
    ShardIndex,
    TarEntry,
    index_path,
    sample_key,
    scan_tar,
    shard_name,
)

log = logging.getLogger(__name__)

Layout = Literal["release", "imagefolder", "csv", "pool"]
PLAN_FORMAT = "timelit-prepare/1"
PLAN_SUFFIX = ".prepare.json"
SKIPPED_SUFFIX = ".skipped.tsv"
POOL_SPLIT = "train"


class PrepareError(RuntimeError):
    """What went wrong in a prepare, every dataset and split at fault listed at once."""


def plan_path(directory: Path, split: str) -> Path:
    return directory / f"{split}{PLAN_SUFFIX}"


# --------------------------------------------------------------------------- shard jobs (run in worker processes)


@dataclass(frozen=True)
class ShardJob:
    """One shard: write it from records (datasets), copy it from a URL (pools), or only scan it (pools in place).

    `check` decodes every image once (the loaders would otherwise meet a broken file mid-run); a bad one fails the
    shard, naming the source file, or with `skip_bad` is left out and reported.
    """

    dataset: str
    split: str
    directory: str
    name: str
    first: int = 0
    records: tuple[Record, ...] = ()
    url: str | None = None
    resize: int | None = None
    check: bool = True
    skip_bad: bool = False

    @property
    def path(self) -> Path:
        return Path(self.directory) / self.name  # an absolute `name` (a pool indexed in place) wins


@dataclass
class ShardScan:
    """What a shard holds: one entry per sample in tar order, and the bad images left out of it (source, reason)."""

    number: int
    written: bool
    offset: np.ndarray
    length: np.ndarray
    label: np.ndarray
    keys: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)


class BadImages(PrepareError):
    """Images that do not decode, as (source file, reason): a shard is not written while it has any."""

    def __init__(self, bad: list[tuple[str, str]]):
        super().__init__(bad)
        self.bad = bad

    def __str__(self) -> str:
        return "; ".join(f"{source}: {reason}" for source, reason in self.bad)


def source_name(record: Record) -> str:
    """The record's image as the user can find it: its file, or the member of a release archive."""
    return record.path if record.offset < 0 else f"{record.name or record.ref} in {record.path}"


def _encode(data: bytes, extension: str, resize: int | None, check: bool = True) -> tuple[bytes, str]:
    """The stored image: the file's bytes, or a re-encoded copy when resizing or for formats outside jpg/png/webp.
    With `check` the image is decoded in full even when its bytes are stored as they are."""
    if extension in IMAGE_EXTENSIONS and resize is None:
        if check:
            decode_image(data)
        return data, extension
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    if resize is not None and min(image.size) > resize:
        # Shorter side to `resize`, bicubic, as the pipeline's resized `_224` variants (FIF_REFERENCE.md §5).
        scale = resize / min(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    elif extension in IMAGE_EXTENSIONS:
        return data, extension
    buffer = io.BytesIO()
    if extension in ("jpg", "jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
        return buffer.getvalue(), "jpg"
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        image = image.convert("RGB")
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def stored_image(record: Record, resize: int | None, check: bool = True) -> tuple[bytes, str] | str:
    """The image bytes and extension to store for a record, or, when it cannot be read or decoded, why not."""
    try:
        data = record.read_bytes()
    except OSError as error:
        return f"cannot be read ({type(error).__name__}: {error})"
    try:
        return _encode(data, record.extension, resize, check)
    except Exception as error:  # PIL raises many types for broken files
        return image_error(error)


def _temporary(path: Path) -> Path:
    """A name of this process's own: after a kill, an orphaned worker may still be finishing the same shard."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_dataset_shard(job: ShardJob) -> list[tuple[str, str]]:
    """Write the shard of `job.records`, leaving out (with `skip_bad`) the images that do not decode; returns those."""
    from webdataset import TarWriter

    tmp = _temporary(job.path)
    bad: list[tuple[str, str]] = []
    with TarWriter(str(tmp), mtime=0.0) as writer:  # mtime 0: the same records always give the same bytes
        for offset, record in enumerate(job.records):
            stored = stored_image(record, job.resize, job.check)
            if isinstance(stored, str):
                bad.append((source_name(record), stored))
                continue
            image, extension = stored
            meta = {"dataset": job.dataset, "split": job.split, "label": record.label, "source_path": record.ref}
            if record.classname is not None:
                meta["classname"] = record.classname
            if len(record.captions) > 1:
                meta["captions"] = list(record.captions)
            key = sample_key(job.dataset, job.split, job.first + offset)
            writer.write({"__key__": key, extension: image, "txt": record.captions[0], "json": meta})
    if bad and not job.skip_bad:
        tmp.unlink(missing_ok=True)
        raise BadImages(bad)
    replace_with(tmp, job.path)
    return bad


def _copy_shard(job: ShardJob) -> None:
    from webdataset.gopen import gopen

    tmp = _temporary(job.path)
    with gopen(job.url, "rb") as source, open(tmp, "wb") as target:
        shutil.copyfileobj(source, target, length=1 << 20)
    replace_with(tmp, job.path)


def _left_out(job: ShardJob, keys: list[str]) -> list[tuple[str, str]]:
    """The records of a dataset shard written by an earlier prepare that it lacks (left out there with
    `--skip_bad true`), with the reason they fail now; a record that now decodes means the shard is stale."""
    present = set(keys)
    bad, stale = [], []
    for offset, record in enumerate(job.records):
        if sample_key(job.dataset, job.split, job.first + offset) in present:
            continue
        stored = stored_image(record, job.resize, job.check)
        if isinstance(stored, str):
            bad.append((source_name(record), stored))
        else:
            stale.append(source_name(record))
    if stale:
        raise PrepareError(
            f"{job.path} lacks {len(stale)} image(s) that decode now (e.g. {stale[0]}), left out by an earlier "
            f"prepare: delete the shard and run prepare again"
        )
    return bad


def _check_pool_samples(path: Path, entries: list[TarEntry]) -> tuple[list[bool], list[tuple[str, str]]]:
    """Decode every sample of a pool shard as the loaders will; returns which are good and the bad ones."""
    index = ShardIndex(
        directory=path.parent,
        split="check",
        shards=[path.name],
        shard=np.zeros(len(entries), dtype=np.int32),
        offset=np.array([e.offset for e in entries], dtype=np.int64),
        length=np.array([e.end - e.offset for e in entries], dtype=np.int64),
        label=np.array([e.label for e in entries], dtype=np.int32),
    )
    good, bad = [], []
    try:
        for position, entry in enumerate(entries):
            raw: dict = {}
            try:
                raw = index.read(position)
                decode_sample(raw)
                good.append(True)
            except (CorruptSampleError, OSError) as error:
                good.append(False)
                source = source_of(raw) or f"sample '{entry.key}' in {path}"
                bad.append((source, str(error).removeprefix(describe(raw)).lstrip(": ") if raw else str(error)))
    finally:
        index.close()
    return good, bad


def run_shard_job(number: int, job: ShardJob) -> ShardScan:
    """Write (or copy) the shard unless it is complete already, then scan it; errors name the shard, bad images
    their source file."""
    written = False
    bad: list[tuple[str, str]] = []
    try:
        if not job.path.is_file():
            if job.url is not None:
                _copy_shard(job)
            elif job.records:
                bad = _write_dataset_shard(job)
            else:
                raise FileNotFoundError(f"{job.path} does not exist")
            written = True
        entries = scan_tar(job.path)
        if job.records and not written:
            bad = _left_out(job, [e.key for e in entries])
        elif not job.records and job.check:
            good, bad = _check_pool_samples(job.path, entries)
            if job.skip_bad:  # a pool's tar files may be the user's own: its bad samples leave the index only
                entries = [e for e, ok in zip(entries, good) if ok]
    except BadImages:
        raise
    except Exception as error:
        raise PrepareError(f"{job.dataset}/{job.split} shard {job.path}: {error}") from error
    if bad and not job.skip_bad:
        raise BadImages(bad)
    return ShardScan(
        number,
        written,
        np.array([e.offset for e in entries], dtype=np.int64),
        np.array([e.end - e.offset for e in entries], dtype=np.int64),
        np.array([e.label for e in entries], dtype=np.int32),
        [e.key for e in entries],
        bad,
    )


# --------------------------------------------------------------------------- plans (main process)


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


def _fingerprint(payload: object) -> str:
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
    fingerprint = _fingerprint(
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


def _is_remote(source: str) -> bool:
    return "{" in source or "://" in source or source.startswith("pipe:")


def pool_plan(pool: PoolManifest, source: str, data_root: Path) -> SplitPlan:
    """Index local img2dataset shards where they are, or copy shards named by URLs / brace patterns first."""
    directory = data_root / pool.name
    if _is_remote(source):
        from braceexpand import braceexpand

        urls = [url for part in source.split("::") for url in braceexpand(part)]
        jobs = [
            ShardJob(pool.name, POOL_SPLIT, str(directory), shard_name(POOL_SPLIT, number), url=url)
            for number, url in enumerate(urls)
        ]
        fingerprint = _fingerprint({"format": PLAN_FORMAT, "pool": pool.name, "urls": urls})
        return SplitPlan(
            pool.name, "pool", POOL_SPLIT, directory, jobs, pool.num_samples, fingerprint, source, ["copied"]
        )
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise LayoutError(f"pool {pool.name}: --source {folder} is neither a folder of .tar shards nor a URL pattern")
    shards = sorted(p for p in folder.glob("*.tar") if p.is_file())
    if not shards:
        raise LayoutError(f"pool {pool.name}: no .tar shards in {folder}")
    same = directory.exists() and directory.resolve() == folder.resolve()
    names = [p.name if same else str(p.resolve()) for p in shards]
    jobs = [ShardJob(pool.name, POOL_SPLIT, str(directory), name) for name in names]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    # "order": the index lists samples by key (see _finish); an index made before that is remade.
    fingerprint = _fingerprint({"format": PLAN_FORMAT, "pool": pool.name, "shards": stats, "order": "key"})
    notes = ["indexed in place" if same else f"indexed in place at {folder}"]
    return SplitPlan(
        pool.name, "pool", POOL_SPLIT, directory, jobs, pool.num_samples, fingerprint, str(folder), notes, False
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


# --------------------------------------------------------------------------- sources -> plans


def _dataset_splits(manifest: DatasetManifest, splits: list[str] | None) -> list[str]:
    chosen = list(splits) if splits else list(manifest.splits)
    unknown = [s for s in chosen if s not in manifest.splits]
    if unknown:
        raise LayoutError(
            f"{manifest.name}: split(s) {unknown} are not in its manifest ({manifest.path}); its splits: "
            f"{sorted(manifest.splits)}"
        )
    return chosen


def _one(datasets: list[str] | None, layout: str) -> str:
    if not datasets or len(datasets) != 1:
        raise LayoutError(f"--layout {layout} prepares one dataset: pass --datasets NAME (got {datasets})")
    return datasets[0]


def build_plans(
    manifest_set: ManifestSet,
    source: str,
    data_root: Path,
    layout: Layout,
    datasets: list[str] | None,
    splits: list[str] | None,
    metadata_dir: str | None,
    variant: Variant,
    caption_template: str | None,
    image_root: str | None,
    resize: int | None,
    samples_per_shard: int,
) -> tuple[list[SplitPlan], list[str], list[str]]:
    """Plans for every requested split, the problems found while listing them, and notes on skipped datasets."""
    plans: list[SplitPlan] = []
    problems: list[str] = []
    skipped: list[str] = []

    def add(manifest: DatasetManifest, split: str, lister) -> None:
        try:
            listing = lister()
        except (LayoutError, OSError) as error:
            problems.append(str(error))
            return
        plans.append(dataset_plan(manifest, split, listing, data_root, samples_per_shard, resize))

    if layout == "pool":
        plans.append(pool_plan(manifest_set.pool(_one(datasets, layout)), source, data_root))
        return plans, problems, skipped
    root = Path(source).expanduser()
    if not root.exists():
        raise LayoutError(f"--source {root} does not exist")
    if layout == "release":
        if datasets:
            chosen = [manifest_set.dataset(name) for name in datasets]
        else:
            chosen = [m for m in manifest_set.datasets.values() if ReleaseImages(root, release_folder(m)).exists]
            skipped = [m.name for m in manifest_set.datasets.values() if m not in chosen]
            if not chosen:
                folders = sorted(release_folder(m) for m in manifest_set.datasets.values())
                raise LayoutError(f"{root}: holds none of the release folders of the manifests ({', '.join(folders)})")
        for manifest in chosen:
            for split in _dataset_splits(manifest, splits):
                add(manifest, split, lambda m=manifest, s=split: release_records(root, m, s, metadata_dir, variant))
    elif layout == "imagefolder":
        manifest = manifest_set.dataset(_one(datasets, layout))
        wanted = splits or [s for s in manifest.splits if (root / s).is_dir()]
        if not wanted:
            raise LayoutError(f"{root}: no split folder of {manifest.name} ({sorted(manifest.splits)}) in it")
        for split in _dataset_splits(manifest, wanted):
            add(manifest, split, lambda m=manifest, s=split: imagefolder_records(root, m, s, caption_template))
    elif layout == "csv":
        manifest = manifest_set.dataset(_one(datasets, layout))
        if root.is_file():
            chosen_splits = splits or (list(manifest.splits) if len(manifest.splits) == 1 else None)
            if not chosen_splits or len(chosen_splits) != 1:
                raise LayoutError(
                    f"{root} is one CSV: name its split with --splits [SPLIT] ({sorted(manifest.splits)})"
                )
            files = {chosen_splits[0]: root}
        else:
            names = splits or [s for s in manifest.splits if (root / f"{s}.csv").is_file()]
            if not names:
                raise LayoutError(
                    f"{root}: no <split>.csv for the splits of {manifest.name} ({sorted(manifest.splits)})"
                )
            files = {s: root / f"{s}.csv" for s in names}
        for split in _dataset_splits(manifest, list(files)):
            add(manifest, split, lambda m=manifest, f=files[split]: csv_records(f, m, image_root))
    else:
        raise LayoutError(f"unknown layout '{layout}'; choose release, imagefolder, csv or pool")
    return plans, problems, skipped


def prepare(
    source: str,
    data_root: str | Path,
    layout: Layout = "release",
    datasets: list[str] | str | None = None,
    splits: list[str] | str | None = None,
    manifests: str | Path | ManifestSet = "fomo_in_flux",
    metadata_dir: str | None = None,
    variant: Variant = "auto",
    caption_template: str | None = None,
    image_root: str | None = None,
    resize: int | None = None,
    samples_per_shard: int = 1000,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    skip_bad: bool = False,
    decode: bool = True,
) -> list[SplitResult]:
    """Prepare shards (see `prepare_command`); raises `PrepareError` listing every problem."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if resize is not None and resize < 1:
        raise ValueError(f"resize must be a positive side length, got {resize}")
    manifest_set = manifests if isinstance(manifests, ManifestSet) else load_manifests(manifests)
    root = Path(data_root).expanduser()
    plans, problems, skipped = build_plans(
        manifest_set,
        source,
        root,
        layout,
        names(datasets),
        names(splits),
        metadata_dir,
        variant,
        caption_template,
        image_root,
        resize,
        samples_per_shard,
    )
    if problems:
        raise PrepareError(_listing("nothing was written", problems))
    for plan in plans:
        plan.jobs = [dataclasses.replace(job, check=decode, skip_bad=skip_bad) for job in plan.jobs]
    states = [settle_state(plan, overwrite) for plan in plans]
    conflicts = [conflict for _, conflict in states if conflict is not None]
    if conflicts:
        raise PrepareError(_listing("nothing was written", conflicts))
    for stale, _ in states:
        for path in stale:
            path.unlink()
    if skipped:
        log.info("not in %s (skipped): %s", source, ", ".join(skipped))
    results, problems = run_plans(plans, workers if workers is not None else (os.cpu_count() or 1), progress)
    if problems:
        headline = "finished shards are kept; fix these and run prepare again"
        if any(": bad image " in problem for problem in problems):
            headline += ", or pass --skip_bad true to leave the bad images out"
        raise PrepareError(_listing(headline, problems, results))
    return results


def _listing(headline: str, problems: list[str], results: list[SplitResult] | None = None) -> str:
    body = "\n".join(f"  - {p}" for p in problems)
    table = "\n" + format_results(results) if results else ""
    return f"{len(problems)} problem(s) ({headline}):\n{body}{table}"


def format_results(results: list[SplitResult]) -> str:
    def cell(value: int | None) -> str:
        return "-" if value is None else str(value)

    lines = [f"{'dataset':<22}{'split':<8}{'samples':>9}{'expected':>10}{'shards':>8}{'written':>9}  status"]
    for r in sorted(results, key=lambda r: (r.dataset, r.split)):
        note = f" ({'; '.join(r.notes)})" if r.notes else ""
        lines.append(
            f"{r.dataset:<22}{r.split:<8}{cell(r.samples):>9}{cell(r.expected):>10}{r.shards:>8}{r.written:>9}  "
            f"{r.status}{note}"
        )
    return "\n".join(lines)


def prepare_command(
    source: str,
    data_root: str,
    layout: Layout = "release",
    datasets: list[str] | str | None = None,
    splits: list[str] | str | None = None,
    manifests: str = "fomo_in_flux",
    metadata_dir: str | None = None,
    variant: Variant = "auto",
    caption_template: str | None = None,
    image_root: str | None = None,
    resize: int | None = None,
    samples_per_shard: int = 1000,
    workers: int | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    decode: bool = True,
) -> None:
    """Convert a downloaded dataset folder into timelit shards under DATA_ROOT/<NAME>/ (resumable, parallel).

    Every image is decoded once, in the worker processes: a file that does not decode is an error naming it (or,
    with --skip_bad true, is left out and listed in DATA_ROOT/<NAME>/<split>.skipped.tsv). Rerun the same command
    after an interruption: finished shards are kept, the rest are written. Every problem (unknown class names, missing
    or bad images, counts that differ from the manifest) is listed at once, and the command exits with status 1; an
    unknown dataset or a source that does not exist ends it with one line and status 2.

    Args:
        source: the downloaded data: the FoMo-in-Flux release folder, with <FOLDER>/ image folders or <FOLDER>.tar
            archives (release); a folder with <split>/<class>/ image folders (imagefolder); a CSV file or a folder of
            <split>.csv files (csv); a folder of img2dataset .tar shards, or shard URLs / brace patterns readable by
            webdataset (pool).
        data_root: where timelit's shards go (the data module's data_root).
        layout: how SOURCE is organised.
        datasets: manifest names to prepare, as NAME or [NAME,...] (release: default every dataset whose folder
            SOURCE holds; other layouts: exactly one, for pool a pool name such as LAION400M).
        splits: splits to prepare, as SPLIT or [SPLIT,...] (default: every split of the manifest that SOURCE holds).
        manifests: the manifest set: fomo_in_flux (shipped) or a folder (`timelit data new` writes one).
        metadata_dir: folder of the release's metadata JSONs (the pipeline's data_lib/00_info); default: SOURCE's
            00_info/, data_lib/00_info/ or SOURCE itself.
        variant: release images to read: the resized 224-pixel copy when present (auto), or force one.
        caption_template: imagefolder caption, '{}' = class name (default: the dataset's prompt template).
        image_root: csv: folder that relative image paths start from (default: the CSV's folder).
        resize: store images with their shorter side shrunk to this many pixels (re-encoded); default: as they are.
        samples_per_shard: images per shard.
        workers: parallel processes, one shard each at a time (default: every CPU core; 0 or 1: in-process).
        overwrite: replace shards prepared earlier from a different source or with other settings.
        skip_bad: leave images that do not decode out (listed in <split>.skipped.tsv and the summary) instead of
            stopping on them.
        decode: decode every image to check it (false: store the bytes unchecked, e.g. for a pool you trust).
    """
    try:
        results = prepare(
            source,
            data_root,
            layout=layout,
            datasets=datasets,
            splits=splits,
            manifests=manifests,
            metadata_dir=metadata_dir,
            variant=variant,
            caption_template=caption_template,
            image_root=image_root,
            resize=resize,
            samples_per_shard=samples_per_shard,
            workers=workers,
            overwrite=overwrite,
            skip_bad=skip_bad,
            decode=decode,
        )
    except PrepareError as error:  # problems found in the data, listed in full; what was asked is wrong: exit 2
        print(f"timelit data prepare: {error}", flush=True)
        raise SystemExit(1) from None
    print(format_results(results))
    for result in results:
        if result.skipped:
            shown = ", ".join(source for source, _ in result.skipped[:5])
            more = f" and {len(result.skipped) - 5} more" if len(result.skipped) > 5 else ""
            print(
                f"{result.dataset}/{result.split}: skipped {len(result.skipped)} bad image(s): {shown}{more} "
                f"(reasons in {result.report})"
            )
