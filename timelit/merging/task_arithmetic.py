"""Task arithmetic: theta = theta_0 + lam * sum_i tau_i (Ilharco et al., arXiv 2212.04089, eq. 1).

    merge(base, experts, "task_arithmetic", lam=0.3)

A sum, not a mean, as in the paper and the FoMo-in-Flux pipeline: with N experts, lam = 1 adds all N task vectors
in full (the paper tunes lam in 0.3-0.4 for 8 tasks; the TIME configs use 1, 0.3 and 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from timelit.merging.task_vectors import Summed
from timelit.merging.technique import TaskVectorTechnique


@dataclass(frozen=True, kw_only=True)
class TaskArithmetic(Summed, TaskVectorTechnique):
    """tau_m = sum_i tau_i; see :class:`TaskVectorTechnique` for lam, scope and the LiNeS flags.

    Incremental: the running state of an `all` merge is the float32 sum (``task_vectors.Summed``)."""

    name: ClassVar[str] = "task_arithmetic"
    hints: ClassVar[dict[str, str]] = {"scaling_factor": "the pipeline's scaling_factor is `lam`"}
