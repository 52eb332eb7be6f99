"""MagMax: per entry, keep the task vector with the largest magnitude (Marczak et al., arXiv 2407.06322).

    merge(base, experts, "magmax")

tau_m[j] = tau_i[j] with i = argmax_i |tau_i[j]|; ties go to the later expert, as in the authors' code and
FusionBench (the pipeline's argmax gives them to the first). theta = theta_0 + lam * tau_m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from timelit.merging.chunks import Chunk
from timelit.merging.technique import Scaling, Technique, check_range


@dataclass(frozen=True, kw_only=True)
class MagMax(Technique):
    """Maximum-magnitude selection per entry.

    Args:
        lam: scale of the selected task vector (default 1, the pipeline's; the paper reports 0.5 for some settings).
    """

    lam: float = 1.0

    name: ClassVar[str] = "magmax"
    hints: ClassVar[dict[str, str]] = {"scaling_factor": "the pipeline's scaling_factor is `lam`"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lam", self.lam)

    def scaling(self) -> Scaling:
        return Scaling(float(self.lam))

    def merge_chunk(self, chunk: Chunk) -> torch.Tensor:
        taus = chunk.task_vectors()
        best = chunk.buffer("result").copy_(next(taus))  # the chunk reuses its buffer for the next expert
        best_magnitude = torch.abs(best, out=chunk.buffer("magmax.best"))
        magnitude, later_wins = chunk.buffer("magmax.magnitude"), chunk.buffer("magmax.later", torch.bool)
        for tau in taus:
            torch.ge(torch.abs(tau, out=magnitude), best_magnitude, out=later_wins)
            torch.where(later_wins, tau, best, out=best)
            torch.where(later_wins, magnitude, best_magnitude, out=best_magnitude)
        return best
