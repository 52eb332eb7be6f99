"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., arXiv 2306.01708, Alg. 1).

    merge(base, experts, "ties", k=0.2)                  # the paper: keep the top 20% of each |tau_i| over the model
    merge(base, experts, "ties", k=0.3, scope="tower")   # the TIME configs (the pipeline's prune_percentile 0.7)

1. Trim: per expert, keep tau_i where |tau_i| >= the ceil(k n)-th largest |tau_i| over the scope's n entries.
   Ties at the threshold are kept (as in the reference code, FusionBench and the pipeline), so more than ceil(k n)
   entries survive exactly when the threshold value repeats. k = 0 keeps nothing, k = 1 keeps everything.
   The threshold is exact (``order_stats``), found in two streamed passes.
   (MERGING.md's rule; deliberately not the reference code's floor(k n) + 1 largest nor the pipeline's ceil(k n) + 1.)
2. Elect: gamma = sign(sum_i trimmed tau_i) per entry (by mass). Where the sum is exactly 0, gamma is the sign of the
   sum of all elected signs over the scope (the reference code's "majority" rule). Where that majority is 0 too,
   the entry's merged value is 0 (symmetric: no side wins); the reference code and the pipeline then take the
   negative side's mean, an artefact of ``where(sign > 0, tau > 0, tau < 0)``.
3. Disjoint mean: average of the trimmed entries whose sign equals gamma (nonzero ones only).
theta = theta_0 + lam * tau_m.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch

from timelit.merging.chunks import Chunk
from timelit.merging.task_vectors import SignElected, keep_magnitudes
from timelit.merging.technique import UNIT, TaskVectorTechnique


@dataclass(frozen=True, kw_only=True)
class Ties(SignElected, TaskVectorTechnique):
    """TIES with k = the fraction of each task vector KEPT (paper default 0.2; the TIME configs use 0.3).

    Incremental: each expert's trim threshold is its own, so an `all` merge carries the four accumulators of the
    sign election (positive and negative sums and counts) and folds in the newest trimmed task vector only.

    Args:
        k: fraction of entries of each |tau_i| kept by the trim, in [0, 1].
    """

    k: float = 0.2

    name: ClassVar[str] = "ties"
    order_statistics: ClassVar[bool] = True
    scoped: ClassVar[bool] = True
    hints: ClassVar[dict[str, str]] = {
        "prune_percentile": "the pipeline's prune_percentile is the fraction DROPPED: k = 1 - prune_percentile",
        "density": "mergekit's density is the fraction kept, `k`",
        "threshold": "FusionBench's threshold (percent kept) is 100 * k",
        "scaling_factor": "the pipeline's scaling_factor is `lam`",
    }
    ranges: ClassVar = {"k": UNIT}

    def ranks(self, n: int) -> tuple[int, ...]:
        return (kept_count(self.k, n),)

    def contributions(self, chunk: Chunk, first: int) -> Iterator[torch.Tensor]:
        bounds = ((threshold, math.inf) for (threshold,) in chunk.thresholds)
        return keep_magnitudes(chunk, bounds)


def kept_count(fraction: float, n: int) -> int:
    """ceil(fraction * n), reading ``fraction`` as the decimal it is written as (so 0.3 * 10 keeps 3, not 4)."""
    return math.ceil(Fraction(repr(float(fraction))) * n)
