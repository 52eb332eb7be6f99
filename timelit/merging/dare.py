"""DARE: drop and rescale task vectors (Yu et al., arXiv 2311.03099), merged by sum (``dare``) or TIES (``dare_ties``).

    merge(base, experts, "dare", p=0.9, seed=0)
    merge(base, experts, "dare_ties", p=0.7, seed=0)   # the TIME configs

Each entry of tau_i is kept with probability 1 - p (an i.i.d. Bernoulli draw, as in the paper) and kept entries are
divided by 1 - p, so E[drop(tau_i)] = tau_i. ``dare`` then adds the rescaled vectors (task arithmetic); ``dare_ties``
elects signs and takes the disjoint mean as TIES does, with no magnitude trim (as in mergekit and the pipeline).
The masks are drawn entry by entry, so ``scope`` matters only to ``dare_ties`` (where zero sums take the scope's
majority sign) and to ``lines_alpha="auto"``; ``dare`` rejects any other scope as having no effect.

The mask of expert i over tensor ``key`` comes from ``seeded.uniforms`` under the stream ``"{seed}/{i}"``: blocks of
65,536 entries, block b's uniforms drawn from a generator seeded with a hash of (seed, i, key, b). A merge therefore
gives the same weights whenever it is recomputed, whatever the chunk size or processing order (the pipeline re-draws
its masks from the global RNG on every call).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from timelit.merging import seeded
from timelit.merging.chunks import Chunk
from timelit.merging.task_vectors import SignElected, Summed
from timelit.merging.technique import UNIT_OPEN, TaskVectorTechnique

BLOCK = seeded.BLOCK


def uniforms(seed: int, expert: int, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Entries ``start:stop`` of the uniforms behind the DARE mask of ``expert`` over tensor ``key``."""
    return seeded.uniforms(f"{seed}/{expert}", key, start, stop, out)


def keep_mask(seed: int, expert: int, key: str, start: int, stop: int, p: float) -> torch.Tensor:
    """Entries ``start:stop`` of the keep mask (True with probability 1 - p) of ``expert`` over tensor ``key``."""
    return uniforms(seed, expert, key, start, stop) >= p


@dataclass(frozen=True, kw_only=True)
class Dare(Summed, TaskVectorTechnique):
    """DARE + task arithmetic: theta = theta_0 + lam * sum_i drop_p(tau_i) / (1 - p).

    Incremental: expert i's mask is drawn from its store index, so an `all` merge folds the newest expert's dropped
    task vector into the running sum with the mask a full merge would draw for it.

    Args:
        p: drop probability in [0, 1) (paper default 0.9; the TIME configs use 0.7). p = 0 is task arithmetic.
        seed: seeds the masks (with the expert index, tensor name and block), so a merge is reproducible.
    """

    p: float = 0.9
    seed: int = 0

    name: ClassVar[str] = "dare"
    hints: ClassVar[dict[str, str]] = {
        "density": "mergekit's density is the fraction kept: p = 1 - density",
        "prune_percentile": "the pipeline's dare prune_percentile is the drop probability `p`",
        "sparsity_ratio": "FusionBench's sparsity_ratio is the drop probability `p`",
    }
    ranges: ClassVar = {"p": UNIT_OPEN}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def contributions(self, chunk: Chunk, first: int) -> Iterator[torch.Tensor]:
        """drop_p(tau_i) / (1 - p) for every expert of the chunk, in store order (the first has index ``first``)."""
        drawn, keep = chunk.buffer("dare.uniforms"), chunk.buffer("dare.keep", torch.bool)
        for i, tau in enumerate(chunk.task_vectors(), start=first):
            uniforms(self.seed, i, chunk.key, chunk.start, chunk.stop, out=drawn)
            yield tau.mul_(torch.ge(drawn, self.p, out=keep)).div_(1 - self.p)


@dataclass(frozen=True, kw_only=True)
class DareTies(SignElected, Dare):
    """DARE + TIES sign election and disjoint mean (no magnitude trim); same p and seed as :class:`Dare`."""

    name: ClassVar[str] = "dare_ties"
    scoped: ClassVar[bool] = True
