"""Pairwise linear interpolation theta = (1 - w) a + w b, with b the newer model: the TIME task-level EMA.

    merge(base, [ema_prev, expert_t], "interpolation", w=0.5)  # ema_t = 0.5 ema_{t-1} + 0.5 expert_t

TIME (arXiv 2412.06712) and the FoMo-in-Flux pipeline use a fixed w = 0.5, not 1/t, so the EMA forgets
geometrically. For N models use ``average``; this is its two-model case with weights [1 - w, w], computed by the same
float64 kernel, so interpolating a model with itself returns it exactly for any w, and w = 0 / 1 return a / b.

Not incremental: it merges two models; an `all` protocol under interpolation takes the average (``average``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from timelit.merging.average import weighted_sum
from timelit.merging.chunks import Chunk
from timelit.merging.technique import UNIT, Technique


@dataclass(frozen=True, kw_only=True)
class Interpolation(Technique):
    """(1 - w) a + w b for exactly two models [a, b]; b is the newer one.

    Args:
        w: weight of the newer model b, in [0, 1] (default 0.5).
    """

    w: float = 0.5

    name: ClassVar[str] = "interpolation"
    space: ClassVar = "weights"
    experts_allowed: ClassVar = (2, 2)
    hints: ClassVar[dict[str, str]] = {
        "weight_coefficients": "the pipeline's weight_coefficients=[w_new, w_old] is w=w_new",
        "t": "interpolation's weight of the newer model is `w`",
    }
    ranges: ClassVar = {"w": UNIT}

    def merge_chunk(self, chunk: Chunk) -> torch.Tensor:
        return weighted_sum(chunk, (1 - self.w, self.w))
