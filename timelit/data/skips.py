"""Samples a loader skipped because they do not decode, and the tally of a run.

    batch["skipped"]                 [Skip(dataset, split, shard, position, reason, shard_problem), ...]
    ledger = SkipLedger(); ledger.add(skip)          -> True the first time this sample is skipped
    ledger.counts()                  {"CREATURES/train": 5}
    ledger.to_dict()                 {"CREATURES/train": {"samples": 5, "shards": {"train-000001.tar": 5}}}

With `data.on_corrupt: skip` a damaged sample is left out of its batch (training replaces it, see TaskBatches), and
every batch lists what it left out. Loader workers are separate processes, so the list travels with the batch to
the main process, where the SkippedSamples callback keeps the run's ledger (timelit/training/callbacks/skipped.py).

The ledger counts samples, not skips: replay draws a damaged training sample again and again, and every evaluation
reads the same test split, but "how many samples are damaged" is what a user can act on (and what `timelit data
verify --decode 1` would find).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple


class Skip(NamedTuple):
    """One sample left out of a batch. A NamedTuple, so that Lightning and torch move batches holding it as they
    are (a frozen dataclass would be refused)."""

    dataset: str
    split: str
    shard: str  # the shard's file name
    position: int  # the sample's place in its split's index
    reason: str  # what did not decode, naming the sample and the shard
    shard_problem: str | None  # set when the whole shard is at fault (empty, truncated): the same for all its samples

    @property
    def split_name(self) -> str:
        return f"{self.dataset}/{self.split}"


class SkipLedger:
    """The distinct samples skipped so far, by dataset split and shard; checkpointable."""

    def __init__(self) -> None:
        self._positions: dict[str, dict[str, set[int]]] = {}  # "DATASET/split" -> shard -> positions

    def add(self, skip: Skip) -> bool:
        """Record `skip`; whether its sample was new to the ledger."""
        positions = self._positions.setdefault(skip.split_name, {}).setdefault(skip.shard, set())
        if skip.position in positions:
            return False
        positions.add(skip.position)
        return True

    def __len__(self) -> int:
        return sum(len(p) for shards in self._positions.values() for p in shards.values())

    def counts(self) -> dict[str, int]:
        """Skipped samples per dataset split, in name order."""
        return {name: sum(len(p) for p in shards.values()) for name, shards in sorted(self._positions.items())}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Per dataset split, the skipped samples and how many of them each shard holds (for results.json)."""
        return {
            name: {
                "samples": sum(len(p) for p in shards.values()),
                "shards": {shard: len(p) for shard, p in sorted(shards.items())},
            }
            for name, shards in sorted(self._positions.items())
        }

    def summary(self) -> str:
        """`25 sample(s): CREATURES/train 20 (train-000001.tar), SHAPES/test 5 (test-000000.tar)`."""
        parts = [
            f"{name} {count} ({', '.join(sorted(self._positions[name]))})" for name, count in self.counts().items()
        ]
        return f"{len(self)} sample(s): {', '.join(parts)}"

    def state_dict(self) -> dict[str, dict[str, list[int]]]:
        return {name: {shard: sorted(p) for shard, p in shards.items()} for name, shards in self._positions.items()}

    def load_state_dict(self, state: dict[str, dict[str, list[int]]]) -> None:
        self._positions = {}
        self.merge([state])

    def merge(self, states: Iterable[dict[str, dict[str, list[int]]]]) -> None:
        """Add the samples of other ledgers' `state_dict`s (those of the other ranks)."""
        for state in states:
            for name, shards in state.items():
                for shard, positions in shards.items():
                    self._positions.setdefault(name, {}).setdefault(shard, set()).update(int(p) for p in positions)
