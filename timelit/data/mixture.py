"""How a training batch is composed: shares per source, per rank, and which sample fills each slot.

Every training batch mixes three sources (FoMo-in-Flux `task.data_mixture`): the current task's samples, replay of
earlier tasks' samples, and a pretraining pool. Each source is an endless sequence: pass p over the source is a
permutation seeded by (seed, task, source, p). Global batch i takes the next `count` entries of each sequence; rank r
takes a fixed contiguous part of them. So the union over ranks of batch i is the same samples whatever the number of
ranks or loader workers, every rank has the same batch size, and resuming at batch k is arithmetic: nothing is read
to skip. Everything here is pure and unit-tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SOURCES = ("pretraining", "current", "replay")
_SOURCE_CODES = {"pretraining": 0, "current": 1, "replay": 2}


@dataclass(frozen=True)
class Mixture:
    """Fractions of each training batch drawn from each source; they must sum to 1.

    Args:
        pretraining: share of the pretraining replay pool (reference: 0.33).
        current: share of the current task's samples (reference: 0.34).
        replay: share of samples of earlier tasks (reference: 0.33); 0 trains without replay.
    """

    pretraining: float = 0.33
    current: float = 0.34
    replay: float = 0.33

    def __post_init__(self) -> None:
        shares = (self.pretraining, self.current, self.replay)
        if any(s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"mixture shares must be non-negative and sum to 1, got {self}")
        if self.current <= 0:
            raise ValueError(f"mixture.current must be positive (a task must train on its own data), got {self}")


def source_counts(batch_size: int, mixture: Mixture, first_task: bool) -> dict[str, int]:
    """Samples per source in one global batch, rounded as the reference pipeline does.

    Each share is truncated, then sources get +1 in the order pretraining, current, replay until the total is the
    batch size (0.33/0.34/0.33 of 512 -> 169/175/168). The first task has nothing to replay: its replay count is
    split between the current task (the larger half) and the pool, or goes wholly to the current task when the
    mixture has no pool (512 -> 253/259/0).
    """
    shares = {"pretraining": mixture.pretraining, "current": mixture.current, "replay": mixture.replay}
    counts = {name: int(share * batch_size) for name, share in shares.items()}
    for name in SOURCES:
        if sum(counts.values()) >= batch_size:
            break
        if shares[name] > 0:
            counts[name] += 1
    counts["current"] += batch_size - sum(counts.values())  # only if every other share was zero
    if first_task and counts["replay"]:
        moved = counts.pop("replay")
        counts["replay"] = 0
        to_pool = moved // 2 if counts["pretraining"] else 0
        counts["pretraining"] += to_pool
        counts["current"] += moved - to_pool
    return counts


def rank_slices(counts: dict[str, int], world_size: int, rank: int) -> dict[str, tuple[int, int]]:
    """(offset, count) of this rank's part of each source in a global batch; every rank gets batch/world samples.

    Each source is split as evenly as possible; the remainders are dealt out in source order so that per-rank
    totals are equal (the contrastive loss all-gathers features, which needs equal shapes on every rank).
    """
    total = sum(counts.values())
    if total % world_size:
        raise ValueError(f"the global batch size {total} is not divisible by the number of ranks {world_size}")
    base = {name: counts[name] // world_size for name in SOURCES}
    extra_per_rank = total // world_size - sum(base.values())
    dealt = [name for name in SOURCES for _ in range(counts[name] % world_size)]
    per_rank = []
    for r in range(world_size):
        mine = dealt[r * extra_per_rank : (r + 1) * extra_per_rank]
        per_rank.append({name: base[name] + mine.count(name) for name in SOURCES})
    return {name: (sum(per_rank[r][name] for r in range(rank)), per_rank[rank][name]) for name in SOURCES}


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


class SourceSequence:
    """An endless, seeded sequence over a fixed set of candidate samples.

    Position j is candidate `perm_p[j % n]` of pass p = j // n, where perm_p is a permutation drawn from
    (seed, task, source, p). The two most recent passes are cached, which is all a batch ever touches.
    """

    def __init__(self, candidates: np.ndarray, seed: int, task: int, source: str):
        if len(candidates) == 0:
            raise ValueError(f"the {source} source of task {task} has no samples")
        self.candidates = candidates
        self._key = (seed, task, _SOURCE_CODES[source])
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.candidates)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = _seed(*self._key, epoch).permutation(len(self.candidates))
        return self._cache[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        """Candidates at positions start .. start + count - 1."""
        positions = np.arange(start, start + count, dtype=np.int64)
        n = len(self.candidates)
        out = np.empty(count, dtype=self.candidates.dtype)
        for epoch in np.unique(positions // n):
            mask = positions // n == epoch
            out[mask] = self.candidates[self._permutation(int(epoch))[positions[mask] % n]]
        return out


def pool_offsets(per_task_counts: list[int], steps_per_task: int) -> list[int]:
    """Where each task starts in the pretraining pool's sequence, which runs on across tasks (as the pipeline's
    LAION replay does) so that the pool is not replayed from its start at every task."""
    offsets, position = [], 0
    for count in per_task_counts:
        offsets.append(position)
        position += count * steps_per_task
    return offsets
