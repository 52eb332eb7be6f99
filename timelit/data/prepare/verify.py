"""`timelit data verify`: check a data root against the manifests before a run depends on it.

    timelit data verify --data_root /data/timelit
    timelit data verify --data_root /data/timelit --datasets [CIFAR100,MSCOCO] --decode 0.05 --pools [LAION400M]

For every split a manifest names (adaptation datasets: train and test; held-out ones: test) and every pool asked for,
it checks that the split is prepared (shard index present and readable), that every shard the index lists exists
and is long enough to hold the samples the index places in it (a truncated copy fails here), the sample count
against the manifest, that labels lie in the class list, and optionally that every (or a sampled fraction of)
image decodes. It prints one table (dataset, role, split, samples, expected, shards, status), then every problem,
and exits with status 1 when anything is missing or broken.

A pool's count may differ from its manifest (every img2dataset download loses a different set of dead links): that
is a warning. So are leftovers of an interrupted prepare beside complete shards, and images that `prepare
--skip_bad true` left out (their count is added to the samples found before comparing with the manifest). `prepare`
decodes every image already, so `--decode` looks for damage done since; a sample that fails is named by its source
file. A data root that holds none of the manifest set's datasets is one error (a forgotten `--manifests`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from timelit.data.manifest import (
    DatasetManifest,
    ManifestError,
    ManifestSet,
    PoolManifest,
    load_manifests,
    names,
)
from timelit.data.prepare.plans import read_plan, skipped_path
from timelit.data.samples import decode as decode_sample
from timelit.data.shard_sizes import shard_sizes
from timelit.data.shards import CorruptSampleError, ShardIndex, index_path

SHOWN_ERRORS = 3


@dataclass
class SplitCheck:
    """The outcome for one split of one dataset (or pool): one row of the table."""

    dataset: str
    role: str
    split: str
    expected: int | None
    samples: int | None = None
    shards: int | None = None
    decoded: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.problems:
            return "MISSING" if self.samples is None else "BROKEN"
        return "ok (warnings)" if self.warnings else "ok"


def _shard_problems(index: ShardIndex) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    for size in shard_sizes(index):
        if size.missing or size.short:
            problems.append(size.describe())
        elif size.missing_end_of_archive:
            problems.append(f"shard {size.path} lacks the end-of-archive blocks (truncated copy?): {size.actual} bytes")
    listed = {Path(name).name for name in index.shards}
    stray = sorted(p.name for p in index.directory.glob(f"{index.split}-*.tar") if p.name not in listed)
    leftovers = sorted(p.name for p in index.directory.glob(f"{index.split}-*.tmp"))
    if stray:
        warnings.append(f"{len(stray)} shard file(s) not in the index (e.g. {stray[0]})")
    if leftovers:
        warnings.append(f"{len(leftovers)} unfinished shard(s) of an interrupted prepare (e.g. {leftovers[0]})")
    return problems, warnings


def _label_problems(index: ShardIndex, manifest: DatasetManifest) -> list[str]:
    labels = index.label
    if manifest.classnames:
        bad = np.flatnonzero((labels < 0) | (labels >= manifest.num_classes))
        if len(bad):
            return [
                f"{len(bad)} label(s) outside 0..{manifest.num_classes - 1} (e.g. sample {int(bad[0])} has "
                f"{int(labels[bad[0]])}); the shards do not match the class list {manifest.path}"
            ]
        return []
    bad = np.flatnonzero(labels < 0)
    if len(bad):
        return [f"{len(bad)} sample(s) without a label (e.g. sample {int(bad[0])}); each image needs its own label"]
    return []


def _decode_problems(index: ShardIndex, fraction: float, seed: int) -> tuple[int, list[str]]:
    """Decode all samples (fraction 1) or a seeded random share of them; report the failures."""
    total = len(index)
    count = total if fraction >= 1 else min(total, max(1, math.ceil(fraction * total)))
    positions = np.arange(total) if count == total else np.sort(np.random.default_rng(seed).choice(total, count, False))
    failures: list[str] = []
    for position in positions:
        try:
            decode_sample(index.read(int(position)))
        except (CorruptSampleError, OSError) as error:
            failures.append(str(error))
    index.close()
    if not failures:
        return count, []
    shown = "; ".join(failures[:SHOWN_ERRORS])
    return count, [f"{len(failures)} of {count} decoded samples are corrupt: {shown}"]


def check_split(
    data_root: Path,
    name: str,
    role: str,
    split: str,
    expected: int | None,
    manifest: DatasetManifest | None,
    decode: float,
    seed: int,
) -> SplitCheck:
    """Every check of one split; a pool passes `manifest=None` (no labels to check, counts only warn)."""
    check = SplitCheck(name, role, split, expected)
    directory = data_root / name
    if not directory.is_dir():
        check.problems.append(f"not prepared: no folder {directory}")
        return check
    if not index_path(directory, split).is_file():
        shards = sorted(directory.glob(f"{split}-*.tar"))
        if shards:
            check.problems.append(
                f"no index {index_path(directory, split).name} beside {len(shards)} shard(s): an interrupted prepare; "
                f"run `timelit data prepare` again to finish it"
            )
        else:
            check.problems.append(f"not prepared: no {split} shards in {directory}")
        return check
    try:
        index = ShardIndex.load(directory, split)
    except (ValueError, OSError) as error:
        check.problems.append(f"unreadable index: {error}")
        return check
    check.samples, check.shards = len(index), len(index.shards)
    if check.samples == 0:
        check.problems.append("the index lists no samples")
    problems, warnings = _shard_problems(index)
    check.problems += problems
    check.warnings += warnings
    skipped = int(read_plan(directory, split).get("skipped") or 0)  # bad images `prepare --skip_bad` left out
    if skipped:
        check.warnings.append(f"{skipped} bad image(s) left out at prepare, listed in {skipped_path(directory, split)}")
    if expected is not None and check.samples + skipped != expected:
        found = f"{check.samples} samples" + (f" (+ {skipped} left out)" if skipped else "")
        message = f"{found}, the manifest states {expected}"
        (check.warnings if manifest is None else check.problems).append(message)
    if manifest is not None:
        check.problems += _label_problems(index, manifest)
    if decode > 0 and check.samples and not problems:
        check.decoded, decode_problems = _decode_problems(index, decode, seed)
        check.problems += decode_problems
    return check


def _check_some_present(root: Path, manifest_set: ManifestSet) -> None:
    """A data root that holds none of the set's datasets is checked against the wrong set (a forgotten --manifests),
    which would otherwise print a "not prepared" line for every split of it."""
    names = [*manifest_set.datasets, *manifest_set.pools]
    if any((root / name).is_dir() for name in names):
        return
    manifest_folders = ("datasets", "classnames", "streams", "pools")  # a set made by `data new` holds its shards
    found = sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in manifest_folders
    )
    holds = f"it holds {', '.join(found[:6])}{', ...' if len(found) > 6 else ''}" if found else "it is empty"
    where = "the shipped FoMo-in-Flux set" if manifest_set.shipped else str(manifest_set.root)
    raise ManifestError(
        f"data_root {root} holds none of the {len(manifest_set.datasets)} datasets of {where} ({holds}); pass "
        f"--manifests DIR for your own manifest set, or --datasets NAME"
    )


def verify(
    data_root: str | Path,
    manifests: str | Path | ManifestSet = "fomo_in_flux",
    datasets: list[str] | str | None = None,
    pools: list[str] | str | None = None,
    decode: bool | float = False,
    seed: int = 0,
) -> list[SplitCheck]:
    """Check `data_root`; returns one `SplitCheck` per split (see `timelit.commands.data.verify_command`)."""
    fraction = 1.0 if decode is True else float(decode or 0.0)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"decode must be true/false or a fraction in [0, 1], got {decode}")
    datasets, pools = names(datasets), names(pools)
    manifest_set = manifests if isinstance(manifests, ManifestSet) else load_manifests(manifests)
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise ManifestError(f"data_root {root} is not a folder; pass the --data_root that `timelit data prepare` wrote")
    if datasets is None and pools is None:
        _check_some_present(root, manifest_set)
    chosen = [manifest_set.dataset(n) for n in datasets] if datasets is not None else manifest_set.datasets.values()
    checks = [
        check_split(root, m.name, m.role, split, info.num_samples, m, fraction, seed)
        for m in sorted(chosen, key=lambda m: (m.role, m.name))
        for split, info in m.splits.items()
    ]
    wanted: list[PoolManifest]
    if pools is None:  # pools present under the data root; absent ones are optional
        wanted = [p for p in manifest_set.pools.values() if (root / p.name).is_dir()]
    else:
        wanted = [manifest_set.pool(n) for n in pools]
    checks += [check_split(root, p.name, "pool", "train", p.num_samples, None, fraction, seed) for p in wanted]
    return checks


def format_checks(checks: list[SplitCheck]) -> str:
    def cell(value: int | None) -> str:
        return "-" if value is None else str(value)

    lines = [f"{'dataset':<22}{'role':<7}{'split':<7}{'samples':>10}{'expected':>10}{'shards':>8}  status"]
    for c in checks:
        lines.append(
            f"{c.dataset:<22}{c.role:<7}{c.split:<7}{cell(c.samples):>10}{cell(c.expected):>10}{cell(c.shards):>8}"
            f"  {c.status}"
        )
    problems = [f"  {c.dataset}/{c.split}: {p}" for c in checks for p in c.problems]
    warnings = [f"  {c.dataset}/{c.split}: {w}" for c in checks for w in c.warnings]
    if warnings:
        lines += ["", f"{len(warnings)} warning(s):", *warnings]
    if problems:
        broken = len({(c.dataset, c.split) for c in checks if c.problems})
        lines += ["", f"{len(problems)} problem(s) in {broken} of {len(checks)} split(s):", *problems]
    else:
        decoded = sum(c.decoded for c in checks)
        extra = f", {decoded} images decoded" if decoded else ""
        lines += ["", f"all {len(checks)} split(s) ok{extra}"]
    return "\n".join(lines)
