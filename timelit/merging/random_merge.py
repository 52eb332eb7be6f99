"""Random merge: every entry takes the task vector of one expert drawn uniformly (the FoMo-in-Flux pipeline's
``random``, a baseline for MagMax-style selection; MERGING.md).

    merge(base, experts, "random", seed=0)

theta[e] = theta_0[e] + lam * tau_j[e] with j drawn uniformly from the N experts for each entry e. The draw comes from
``seeded.uniforms`` under the stream ``"random/{seed}"`` (blocks hashed with the tensor name and offset), so the same
merge recomputed (after a restart, in the next task's EMA, with another chunk size) gives the same weights; the
pipeline re-draws from the global RNG on every call, so its next task starts from a model other than the one it
evaluated. j = floor(u N) for a float32 uniform u = m / 2^24, computed exactly in float64: each expert gets
floor(2^24 / N) or ceil(2^24 / N) of the 2^24 values of m, a bias below 2^-24.

Not incremental: the expert chosen per entry, floor(u N), changes with N and may be any earlier expert, so an `all`
protocol reads every expert again at each boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from timelit.merging import seeded
from timelit.merging.chunks import Chunk
from timelit.merging.technique import FINITE, Scaling, Technique


def choices(
    seed: int, n_experts: int, key: str, start: int, stop: int, drawn: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Entries ``start:stop`` of the expert chosen per entry of tensor ``key``, as float64 in ``out`` (``drawn``: a
    float32 buffer of the same length for the uniforms)."""
    seeded.uniforms(f"random/{seed}", key, start, stop, out=drawn)
    return out.copy_(drawn).mul_(n_experts).floor_()  # exact: m has 24 bits and N far fewer than 29


@dataclass(frozen=True, kw_only=True)
class RandomMerge(Technique):
    """A uniformly random expert's task vector per entry.

    Args:
        lam: scale of the selected task vector (default 1, the pipeline's).
        seed: seeds the choices (with the tensor name and offset), so a merge is reproducible.
    """

    lam: float = 1.0
    seed: int = 0

    name: ClassVar[str] = "random"
    hints: ClassVar[dict[str, str]] = {"scaling_factor": "the pipeline's scaling_factor is `lam`"}
    ranges: ClassVar = {"lam": FINITE}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def scaling(self) -> Scaling:
        return Scaling(float(self.lam))

    def merge_chunk(self, chunk: Chunk) -> torch.Tensor:
        drawn, index = chunk.buffer("random.uniforms"), chunk.buffer("random.index", torch.float64)
        index = choices(self.seed, chunk.n_experts, chunk.key, chunk.start, chunk.stop, drawn, index)
        taus = chunk.task_vectors()
        result = chunk.buffer("result").copy_(next(taus))  # the chunk reuses its buffer for the next expert
        picked = chunk.buffer("random.picked", torch.bool)
        for i, tau in enumerate(taus, start=1):
            torch.where(torch.eq(index, i, out=picked), tau, result, out=result)
        return result
