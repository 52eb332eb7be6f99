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
from timelit.merging.technique import FINITE, Scaling, Technique


@dataclass(frozen=True, kw_only=True)
class MagMax(Technique):
    """Maximum-magnitude selection per entry.

    Args:
        lam: scale of the selected task vector (default 1, the pipeline's; the paper reports 0.5 for some settings).
    """

    lam: float = 1.0

    name: ClassVar[str] = "magmax"
    incremental: ClassVar[bool] = True
    hints: ClassVar[dict[str, str]] = {"scaling_factor": "the pipeline's scaling_factor is `lam`"}
    ranges: ClassVar = {"lam": FINITE}

    def scaling(self) -> Scaling:
        return Scaling(float(self.lam))

    def state_fields(self) -> dict[str, str]:
        """The selected task vector and its magnitude; an `all` merge carries them (incremental)."""
        return {"best": "result", "best_magnitude": "magmax.best"}

    def fold(self, state: dict[str, torch.Tensor], contribution: torch.Tensor, first: bool, chunk: Chunk) -> None:
        best, best_magnitude = state["best"], state["best_magnitude"]
        if first:
            torch.abs(best.copy_(contribution), out=best_magnitude)  # the chunk reuses its buffer for the next expert
            return
        magnitude, later_wins = chunk.buffer("magmax.magnitude"), chunk.buffer("magmax.later", torch.bool)
        torch.ge(torch.abs(contribution, out=magnitude), best_magnitude, out=later_wins)
        torch.where(later_wins, contribution, best, out=best)
        torch.where(later_wins, magnitude, best_magnitude, out=best_magnitude)

    def finish(self, state: dict[str, torch.Tensor], chunk: Chunk) -> torch.Tensor:
        return state["best"]
