"""Shard files against the sizes their index implies, checked without reading a byte of them.

    problems = shard_size_problems([ShardIndex.load(root / "CIFAR100", "train"), ...])   # [] when all is there

A shard index places every sample at (shard, offset, length), so it says how long each shard must at least be: up
to the end of its last sample. One `stat` per shard then finds a missing shard, an empty one or a truncated copy
in a second or two for all of FoMo-in-Flux, where reading would find it hours into a run, at the first task that
draws from it (issue 20). `timelit fit` checks every shard of the stream, the pool and the evaluation sets when its
data module is set up (`TimeDataModule.setup`); `timelit data verify` runs the same check among its others.

A shard can also lack the two 512-byte zero blocks that end a tar archive while every sample is whole: training
reads samples by their offsets and never gets there, so only `data verify`, which checks a copy for completeness,
calls that a problem (`missing_end_of_archive`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from timelit.data.shards import ShardIndex, describe_shard

# A tar archive ends with two 512-byte zero blocks; a complete shard is at least that much longer than its last sample.
END_OF_ARCHIVE = 1024


@dataclass(frozen=True)
class ShardSize:
    """One shard as its index describes it and as it is on disk."""

    path: Path
    samples: int  # how many samples the index places in it
    needed: int  # the byte where its last sample ends
    actual: int | None  # its size on disk; None when the file is missing

    @property
    def missing(self) -> bool:
        return self.actual is None

    @property
    def short(self) -> bool:
        """Too short to hold every sample the index places in it (empty or truncated)."""
        return self.actual is not None and self.actual < self.needed

    @property
    def missing_end_of_archive(self) -> bool:
        whole = self.actual is not None and self.samples > 0 and self.actual >= self.needed
        return whole and self.actual < self.needed + END_OF_ARCHIVE  # type: ignore[operator]

    def describe(self) -> str:
        """`shard X is missing (N samples)`, `shard X is empty (...)`, `shard X ends at byte N of M (...)`."""
        return describe_shard(self.path, self.samples, self.needed, self.actual)


def shard_sizes(index: ShardIndex) -> list[ShardSize]:
    """Every shard of `index`, with the size its samples need and the size on disk."""
    ends, counts = index.shard_ends(), index.shard_counts()
    sizes = []
    for number, name in enumerate(index.shards):
        path = index.directory / name
        try:
            actual: int | None = path.stat().st_size
        except FileNotFoundError:
            actual = None
        sizes.append(ShardSize(path, int(counts[number]), int(ends[number]), actual))
    return sizes


def shard_size_problems(indexes: list[ShardIndex]) -> tuple[list[ShardSize], list[ShardSize]]:
    """(missing shards, short shards) of every index, in the order given."""
    sizes = [size for index in indexes for size in shard_sizes(index) if size.samples]
    return [s for s in sizes if s.missing], [s for s in sizes if s.short]
