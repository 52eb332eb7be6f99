"""Weight averaging: theta = sum_i w_i theta_i (model soups, arXiv 2203.05482; the pipeline's ``interpolation``).

    merge(base, experts, "average")                                   # uniform, the TIME "all" merge by default
    merge(base, experts, "average", weights=[0.1, 0.2, 0.3, 0.4])    # e.g. the pipeline's linear offline weighting

The sum is accumulated in float32 in store order; with uniform weights each expert is scaled by 1/N before adding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from timelit.merging.chunks import Chunk
from timelit.merging.task_vectors import sum_in_order
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
        weights = self.weights or (1 / chunk.n_experts,) * chunk.n_experts
        scaled = (theta.mul_(w) for w, theta in zip(weights, chunk.experts(), strict=True))
        return sum_in_order(scaled, out=chunk.buffer("result"))
