"""Exact order statistics of |tau| over a whole scope in two streamed passes and a few MB of memory.

    thresholds = largest(magnitudes, n_experts=20, ranks=(ceil(0.2 * n),))  # TIES: the top-20% cut per expert

TIES and Breadcrumbs trim each expert's task vector at a magnitude quantile taken over the whole model (or tower),
which reference code finds with ``kthvalue`` on the flattened, stacked task vectors: N x model floats in memory.
For non-negative float32 values the bit pattern, read as an int32, orders exactly as the value does. So:

1. pass 1 counts |tau_i| per expert in 2^15 bins of its high 16 bits (the sign bit is 0) and finds the bin that
   holds the wanted rank;
2. pass 2 counts, inside that bin only, the low 16 bits, which pins down the exact value.

Memory: 256 KB per expert for pass 1 and 512 KB per (expert, boundary bin) for pass 2. The result is the exact
k-th largest value, as ``kthvalue`` would give, and it does not depend on how the scope was cut into chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

_HIGH_BINS = 1 << 15
_LOW_BINS = 1 << 16
_ONE = torch.ones(1, dtype=torch.int64)

Magnitudes = Callable[[], Iterable[tuple[int, torch.Tensor]]]
"""Called once per pass; yields ``(expert index, |tau| of one chunk as float32)`` over the whole scope. The passes
may overwrite the yielded tensors."""


def largest(magnitudes: Magnitudes, n_experts: int, ranks: Sequence[int]) -> list[tuple[float, ...]]:
    """Per expert, the ``ranks[j]``-th largest magnitude over the scope (rank 1 = the maximum, rank 0 = +inf).

    Ranks must lie in ``[0, n]`` for a scope of ``n`` entries. Ties count once per entry, like ``kthvalue``.
    """
    high = torch.zeros(n_experts, _HIGH_BINS, dtype=torch.int64)
    for i, magnitude in magnitudes():
        _count(high[i], _bits(magnitude).bitwise_right_shift_(16))
    targets = [[_locate(high[i], rank) if rank > 0 else None for rank in ranks] for i in range(n_experts)]
    boundary_bins = [sorted({target[0] for target in per if target is not None}) for per in targets]
    low = {
        (i, bin_): torch.zeros(_LOW_BINS, dtype=torch.int64) for i, bins in enumerate(boundary_bins) for bin_ in bins
    }
    if low:
        scratch = torch.empty(0, dtype=torch.int32)
        for i, magnitude in magnitudes():
            bits = _bits(magnitude)
            if len(scratch) < len(bits):
                scratch = torch.empty(len(bits), dtype=torch.int32)
            high_bits = torch.bitwise_right_shift(bits, 16, out=scratch[: len(bits)])
            for bin_ in boundary_bins[i]:
                _count(low[(i, bin_)], bits[high_bits == bin_].bitwise_and_(0xFFFF))
    return [
        tuple(math.inf if target is None else _value(low[(i, target[0])], *target) for target in per)
        for i, per in enumerate(targets)
    ]


def _count(histogram: torch.Tensor, bins: torch.Tensor) -> None:
    """histogram[b] += number of entries equal to b. Unlike ``bincount(minlength=...)`` this allocates nothing per
    call, which matters when a pass makes thousands of calls."""
    histogram.index_add_(0, bins, _ONE.expand(len(bins)))


def _bits(magnitude: torch.Tensor) -> torch.Tensor:
    if magnitude.dtype != torch.float32:
        raise TypeError(f"magnitudes must be float32, got {magnitude.dtype}")
    return magnitude.view(torch.int32)


def _locate(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin that holds the ``rank``-th largest entry and that entry's rank inside the bin."""
    from_top = histogram.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=torch.int64)))
    if position >= len(histogram):
        raise ValueError(f"rank {rank} exceeds the {int(from_top[-1])} entries counted")
    above = int(from_top[position - 1]) if position > 0 else 0
    return len(histogram) - 1 - position, rank - above


def _value(low: torch.Tensor, high_bin: int, rank: int) -> float:
    """The float32 whose high 16 bits are ``high_bin`` and whose low 16 bits hold the ``rank``-th largest entry."""
    low_bin, _ = _locate(low, rank)
    return torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32).item()
