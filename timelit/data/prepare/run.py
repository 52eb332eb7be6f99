"""`prepare`: the shards of every split that `PrepareOptions` asks for, resumable and in parallel.

    timelit data prepare --source /data/fomo_in_flux --metadata_dir fomo_in_flux/data_lib/00_info --data_root /data/tl
    timelit data prepare --layout pool --source ./data/laion400m/shards --datasets [LAION400M] --data_root /data/tl
    timelit data prepare --layout pool --source ./my_pool --datasets [MYPOOL] --data_root /data/tl --pool_copy true

Output: `<data_root>/<NAME>/<split>-NNNNNN.tar` + `<split>.index.safetensors` (the format of `timelit.data.shards`)
and `<split>.prepare.json`, the plan of the split; with `--skip_bad true`, `<split>.skipped.tsv` (source, reason) of
the images left out, whose count `verify` adds to the samples it finds. Every problem is listed at once, before
anything is written where it can be (unknown classes, missing images, conflicting earlier shards).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from timelit.data.manifest import ManifestSet, load_manifests, names
from timelit.data.prepare import csv_files, imagefolder, release
from timelit.data.prepare.options import PrepareOptions
from timelit.data.prepare.plans import SplitPlan, SplitResult, dataset_plan, run_plans, settle_state
from timelit.data.prepare.pool import pool_plan
from timelit.data.prepare.records import LayoutError, Lister, chosen_splits, one_dataset
from timelit.data.prepare.shard_jobs import PrepareError

log = logging.getLogger(__name__)


def build_plans(manifest_set: ManifestSet, options: PrepareOptions) -> tuple[list[SplitPlan], list[str], list[str]]:
    """Plans for every requested split, the problems found while listing them, and notes on skipped datasets."""
    data_root = Path(options.data_root).expanduser()
    if options.layout == "pool":
        pool = manifest_set.pool(one_dataset(names(options.datasets), options.layout))
        return [pool_plan(pool, options.source, data_root, options.pool_copy)], [], []
    if options.pool_copy:
        raise LayoutError(f"--pool_copy applies to --layout pool only (this is --layout {options.layout})")
    root = Path(options.source).expanduser()
    if not root.exists():
        raise LayoutError(f"--source {root} does not exist")
    skipped: list[str] = []
    found: list[Lister]
    if options.layout == "release":
        found, skipped = release.listers(manifest_set, root, options)
    elif options.layout in ("imagefolder", "csv"):
        manifest = manifest_set.dataset(one_dataset(names(options.datasets), options.layout))
        layout = imagefolder if options.layout == "imagefolder" else csv_files
        readers = layout.split_readers(manifest, root, options)
        found = [(manifest, split, readers[split]) for split in chosen_splits(manifest, list(readers))]
    else:
        raise LayoutError(f"unknown layout '{options.layout}'; choose release, imagefolder, csv or pool")
    plans: list[SplitPlan] = []
    problems: list[str] = []
    for manifest, split, listing in found:
        try:
            records = listing()
        except (LayoutError, OSError) as error:
            problems.append(str(error))
            continue
        plans.append(dataset_plan(manifest, split, records, data_root, options.samples_per_shard, options.resize))
    return plans, problems, skipped


def prepare(options: PrepareOptions, progress: bool = True) -> list[SplitResult]:
    """Prepare shards (see `PrepareOptions`); raises `PrepareError` listing every problem."""
    manifest_set = load_manifests(options.manifests)
    plans, problems, skipped = build_plans(manifest_set, options)
    if problems:
        raise PrepareError(_listing("nothing was written", problems))
    for plan in plans:
        plan.jobs = [dataclasses.replace(job, check=options.decode, skip_bad=options.skip_bad) for job in plan.jobs]
    states = [settle_state(plan, options.overwrite) for plan in plans]
    conflicts = [conflict for _, conflict in states if conflict is not None]
    if conflicts:
        raise PrepareError(_listing("nothing was written", conflicts))
    for stale, _ in states:
        for path in stale:
            path.unlink()
    if skipped:
        log.info("not in %s (skipped): %s", options.source, ", ".join(skipped))
    workers = options.workers if options.workers is not None else (os.cpu_count() or 1)
    results, problems = run_plans(plans, workers, progress)
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
