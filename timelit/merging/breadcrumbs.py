"""Model Breadcrumbs: drop the largest and the smallest entries of each task vector (arXiv 2312.06795).

    merge(base, experts, "breadcrumbs", top_drop=0.01, bottom_drop=0.7)
    merge(base, experts, "breadcrumbs", beta=0.01, gamma=0.7)   # the same, in shared/MERGING.md's names
    merge(base, experts, "breadcrumbs_ties", top_drop=0.01, bottom_drop=0.7, scope="tower")  # the TIME configs

Per expert over the scope's n entries, keep lower <= |tau_i| <= upper, where upper is the (floor(top_drop n) + 1)-th
largest and lower the (floor(bottom_drop n) + 1)-th smallest |tau_i| (the pipeline's bounds; ties at either bound are
kept). ``breadcrumbs`` then adds the masked vectors (task arithmetic, as in the paper); ``breadcrumbs_ties`` elects
signs and takes the disjoint mean as TIES does (the pipeline's ``breadcrumbs_ties``).

Naming: the paper's and the codes' beta/gamma disagree, so timelit's fields are named by what they drop, and
``validate`` also accepts shared/MERGING.md's ``beta`` and ``gamma`` for them (giving a name and its alias together is
an error). The provenance records ``top_drop`` and ``bottom_drop``, whichever name was given:

| timelit (alias)             | MERGING.md       | FoMo-in-Flux pipeline    | authors' code    | mergekit            |
|-----------------------------|------------------|--------------------------|------------------|---------------------|
| ``top_drop`` (``beta``)     | beta (largest)   | ``top_prune_percentile`` | gamma (largest)  | ``gamma``           |
| ``bottom_drop`` (``gamma``) | gamma (smallest) | ``prune_percentile``     | 1 - beta - gamma | 1 - density - gamma |

(the authors' code is rezazzr/breadcrumbs; its beta is the fraction kept, as is mergekit's density.) So a ``gamma``
copied from the authors' code or mergekit is the largest fraction dropped: it belongs in ``top_drop``, not in
timelit's ``gamma``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch

from timelit.merging.chunks import Chunk
from timelit.merging.task_vectors import SignElected, Summed, keep_magnitudes
from timelit.merging.technique import UNIT, TaskVectorTechnique


@dataclass(frozen=True, kw_only=True)
class Breadcrumbs(Summed, TaskVectorTechnique):
    """Breadcrumbs + task arithmetic.

    Incremental: both bounds of an expert's mask are its own order statistics, so an `all` merge folds the newest
    masked task vector into the running sum (``breadcrumbs_ties``: into the sign election's accumulators).

    Args:
        top_drop: fraction of the largest |tau_i| dropped per expert over the scope (default 0.01); alias ``beta``.
        bottom_drop: fraction of the smallest |tau_i| dropped (default 0.7); alias ``gamma``. top_drop + bottom_drop
            must be < 1.
    """

    top_drop: float = 0.01
    bottom_drop: float = 0.7

    name: ClassVar[str] = "breadcrumbs"
    order_statistics: ClassVar[bool] = True
    scoped: ClassVar[bool] = True
    aliases: ClassVar[dict[str, str]] = {"beta": "top_drop", "gamma": "bottom_drop"}
    hints: ClassVar[dict[str, str]] = {
        "top_prune_percentile": "the pipeline's top_prune_percentile is `top_drop`",
        "prune_percentile": "the pipeline's prune_percentile is `bottom_drop`",
    }
    ranges: ClassVar = {"top_drop": UNIT, "bottom_drop": UNIT}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_drop + self.bottom_drop >= 1:
            raise ValueError(f"top_drop + bottom_drop = {self.top_drop + self.bottom_drop} drops everything")

    def ranks(self, n: int) -> tuple[int, ...]:
        top, bottom = _floor(self.top_drop, n), _floor(self.bottom_drop, n)
        if top + bottom >= n:
            raise ValueError(f"dropping {top} largest and {bottom} smallest of {n} entries leaves nothing")
        return (top + 1, n - bottom)

    def contributions(self, chunk: Chunk, first: int) -> Iterator[torch.Tensor]:
        """tau_i with the largest top_drop and smallest bottom_drop fractions zeroed, per expert in store order."""
        bounds = ((lower, upper) for upper, lower in chunk.thresholds)
        return keep_magnitudes(chunk, bounds)


@dataclass(frozen=True, kw_only=True)
class BreadcrumbsTies(SignElected, Breadcrumbs):
    """Breadcrumbs masks + TIES sign election and disjoint mean."""

    name: ClassVar[str] = "breadcrumbs_ties"


def _floor(fraction: float, n: int) -> int:
    """floor(fraction * n), reading ``fraction`` as the decimal it is written as (0.7 * 10 drops 7, not 6)."""
    return math.floor(Fraction(repr(float(fraction))) * n)
