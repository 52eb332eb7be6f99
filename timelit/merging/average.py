"""Weight averaging: theta = sum_i w_i theta_i (model soups, arXiv 2203.05482; the pipeline's ``interpolation``).

    merge(base, experts, "average")                                   # uniform, the TIME "all" merge by default
    merge(base, experts, "average", weights=[0.1, 0.2, 0.3, 0.4])    # e.g. the pipeline's linear offline weighting

The sum is accumulated in float64 in store order and rounded to float32 once (:func:`weighted_sum`), so averaging
identical experts returns them bit for bit, and one-hot weights return that expert.

Not incremental (an `all` protocol merges every expert again at each boundary): the weights 1/N change with N and each
weighted product is rounded on its own, so the sum cannot be carried from a running total bit for bit; accumulating
sum_i theta_i and dividing once would change the bits of existing offline-merging runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from timelit.merging.chunks import Chunk
from timelit.merging.technique import Technique, check_range


@dataclass(frozen=True, kw_only=True)
class Average(Technique):
    """Weighted average of the experts' weights; the base only supplies non-floating and skipped tensors.

    Args:
        weights: one weight per expert in store order; uniform 1/N when omitted. They must sum to 1 (within 1e-6),
            as in the FoMo-in-Flux pipeline, unless ``normalize`` is set.
        normalize: divide the weights by their sum instead of rejecting weights that do not sum to 1.
    """

    weights: tuple[float, ...] | None = None
    normalize: bool = False

    name: ClassVar[str] = "average"
    space: ClassVar = "weights"
    hints: ClassVar[dict[str, str]] = {"weight_coefficients": "the pipeline's weight_coefficients are `weights`"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        if self.weights is None:
            return
        if not isinstance(self.weights, (list, tuple)):
            raise ValueError(f"weights must be a list with one number per expert, got {self.weights!r}")
        weights = tuple(check_range(f"weights[{i}]", w) for i, w in enumerate(self.weights))
        total = math.fsum(weights)
        if self.normalize:
            if total == 0:
                raise ValueError(f"weights {list(weights)} sum to 0 and cannot be normalized")
            weights = tuple(w / total for w in weights)
        elif abs(total - 1) > 1e-6:
            raise ValueError(f"weights {list(weights)} sum to {total}, not 1; pass normalize=True to rescale them")
        object.__setattr__(self, "weights", weights)

    def check_experts(self, n: int) -> None:
        super().check_experts(n)
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"average got {len(self.weights)} weights for {n} experts")

    def merge_chunk(self, chunk: Chunk) -> torch.Tensor:
        return weighted_sum(chunk, self.weights or uniform(chunk.n_experts))

    def hparams(self, n_experts: int | None = None) -> dict[str, Any]:
        """As :meth:`Technique.hparams`, with omitted weights recorded as the uniform 1/N used (given N). Normalized
        weights are recorded as normalized, with ``normalize: false``: normalizing them again could move a weight by
        an ulp, and the record must rebuild the same merge."""
        values = super().hparams(n_experts)
        if self.weights is None and n_experts is not None:
            values["weights"] = list(uniform(n_experts))
        values["normalize"] = False
        return values


def uniform(n: int) -> tuple[float, ...]:
    return (1 / n,) * n


_BLOCK = 1 << 18
"""Entries of a float64 product formed at a time (2 MB): it is still in cache when it is added to the total. A
20-expert average of 10M parameters in memory on this project's 2-core VM (one thread, best of 7) took about 0.19 s
in float32, 0.47 s with whole-chunk float64 products and 0.34 s in blocks of 2^18. The rest of the gap is three
float64 passes per expert (convert, scale, add) against two in float32; a fused ``add(alpha=w)`` is ruled out below."""


def weighted_sum(chunk: Chunk, weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i theta_i over the chunk's experts in store order, in float64, rounded once to float32.

    Why float64: in float32 every product and partial sum rounds, so three identical experts averaged with weights
    1/3 come back with ~30% of their entries 1 ulp off (five: ~20%). In float64 the result errs by ~N * 2^-53
    relative, far below half a float32 ulp (>= 2^-25 relative), so rounding once gives identical experts back exactly
    whenever the weights sum to 1 within ~2^-26 (uniform weights do), one-hot weights give that expert, and other
    averages are the exact value rounded once instead of drifting by up to ~N/2 ulp. The cost is a float64 total of
    the chunk's length (32 MB at the default chunk size) and a 2 MB product, not a float64 model.

    Each product is formed in its own buffer and added with a plain add, never ``add(alpha=w)``: a fused
    multiply-add in the vectorised loop but not in its scalar tail would make the bits depend on the chunk size.
    Every operation is element-wise, so the blocks do not change any bit either.
    """
    n = len(chunk)
    total = chunk.buffer("average.total", torch.float64)
    term = chunk.buffer("average.term", torch.float64, min(n, _BLOCK))
    for i, (w, theta) in enumerate(zip(weights, chunk.experts(), strict=True)):
        for start in range(0, n, _BLOCK):
            stop = min(start + _BLOCK, n)
            if i == 0:  # initialise from the first expert rather than zeroing and adding
                total[start:stop].copy_(theta[start:stop]).mul_(w)
            else:
                total[start:stop] += term[: stop - start].copy_(theta[start:stop]).mul_(w)
    return chunk.buffer("result").copy_(total)
