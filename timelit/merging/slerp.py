"""Spherical linear interpolation of weights, per tensor (Shoemake 1985; mergekit's and the pipeline's ``slerp``).

    merge(base, [older, newer], "slerp", t=0.5)

For two tensors a, b with Omega = arccos(<a, b> / (|a| |b|)):
``slerp(a, b, t) = sin((1 - t) Omega) / sin Omega * a + sin(t Omega) / sin Omega * b``, falling back to the lerp
``(1 - t) a + t b`` when |cos Omega| > 0.9995 (nearly parallel, where the formula is ill-conditioned) or a norm is 0.
Fine-tuned experts are usually that close to each other, so SLERP on raw weights often is a lerp.

More than two models have no standard SLERP. timelit folds them in store order, theta <- slerp(theta, theta_j, 1/j)
for j = 2..N, which weights every model 1/N when they are collinear, like a running mean (documented choice;
mergekit offers ``multislerp``/``karcher`` instead).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from timelit.merging.chunks import Chunk, TensorJob
from timelit.merging.technique import Technique, check_range

if TYPE_CHECKING:
    from timelit.merging.running import Running

_PARALLEL = 0.9995


@dataclass(frozen=True, kw_only=True)
class Slerp(Technique):
    """SLERP of two models, or the running fold over N > 2.

    Args:
        t: weight of the newer (second) model, in [0, 1]; default 0.5. Only for two models: with N > 2 the fold
            uses t_j = 1/j and an explicit ``t`` is an error.
    """

    t: float | None = None

    name: ClassVar[str] = "slerp"
    incremental: ClassVar[bool] = True
    space: ClassVar = "weights"
    experts_allowed: ClassVar = (2, None)
    hints: ClassVar[dict[str, str]] = {
        "weight_coefficients": (
            "the pipeline calls slerp([newer, older]) and its weight_coefficients[0] weights the second, older "
            "model, so `t` (the newer model's weight) = 1 - weight_coefficients[0]"
        )
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.t is not None:
            check_range("t", self.t, 0.0, 1.0)

    def check_experts(self, n: int) -> None:
        super().check_experts(n)
        if n > 2 and self.t is not None:
            raise ValueError(f"slerp's t applies to two models; over {n} it folds with t_j = 1/j, so leave t unset")

    def merge_tensor(self, job: TensorJob) -> Iterator[tuple[Chunk, torch.Tensor]]:
        """Omega is a whole-tensor statistic: one pass accumulates <a, b>, |a|^2 and |b|^2 over the chunks (in
        float64, chunk by chunk in order), a second forms the result. The running result of the fold is held for
        this one tensor only."""
        chunks = list(job.chunks())
        current = [chunk.expert(0).clone() for chunk in chunks]  # clone: the chunk reuses its buffer
        for j in range(1, len(job.experts)):
            self._fold_into(current, chunks, j, j)
        yield from zip(chunks, current, strict=True)

    def state_fields(self) -> dict[str, str]:
        """The fold so far; an `all` merge carries it (incremental; the fold is over all experts, so ``t`` unset)."""
        return {"current": "slerp.current"}

    def update_tensor(self, job: TensorJob, running: Running) -> Iterator[tuple[Chunk, torch.Tensor]]:
        """:meth:`merge_tensor` continued from the fold so far (read from the state) with the new experts."""
        chunks = list(job.chunks())
        if running.folded == 0:
            current, start = [chunk.expert(0).clone() for chunk in chunks], 1
        else:
            current = [running.load(chunk, self.state_fields())["current"].clone() for chunk in chunks]
            start = 0
        for j in range(start, len(job.experts)):
            self._fold_into(current, chunks, j, running.folded + j)
        for chunk, a in zip(chunks, current, strict=True):
            running.store(chunk, {"current": a})
        yield from zip(chunks, current, strict=True)

    def _fold_into(self, current: list[torch.Tensor], chunks: list[Chunk], j: int, index: int) -> None:
        """current <- slerp(current, the job's expert ``j``, t), whose store index is ``index`` (t = 1/(index+1))."""
        t = (1 / (index + 1)) if self.t is None else self.t
        dot = norm_a = norm_b = 0.0
        for a, chunk in zip(current, chunks, strict=True):
            a64, b64 = a.double(), chunk.expert(j).double()
            dot, norm_a, norm_b = dot + float(a64 @ b64), norm_a + float(a64 @ a64), norm_b + float(b64 @ b64)
        weight_a, weight_b = _coefficients(dot, norm_a, norm_b, t)
        for a, chunk in zip(current, chunks, strict=True):
            # In float64, rounded once, as ``average.weighted_sum`` does: identical models (where SLERP is the
            # lerp) come back exactly for any t, and so does every step of the fold over identical models.
            mixed = chunk.buffer("slerp.a", torch.float64).copy_(a).mul_(weight_a)
            a.copy_(mixed.add_(chunk.buffer("slerp.b", torch.float64).copy_(chunk.expert(j)).mul_(weight_b)))

    def hparams(self, n_experts: int | None = None) -> dict[str, Any]:
        """As :meth:`Technique.hparams`, with an omitted ``t`` recorded as 0.5 for two models; over more it stays
        null, which means the fold t_j = 1/j."""
        values = super().hparams(n_experts)
        if self.t is None and n_experts == 2:
            values["t"] = 0.5
        return values


def _coefficients(dot: float, norm_a: float, norm_b: float, t: float) -> tuple[float, float]:
    if norm_a == 0 or norm_b == 0:
        return 1 - t, t
    cos = max(-1.0, min(1.0, dot / math.sqrt(norm_a * norm_b)))
    if abs(cos) > _PARALLEL:
        return 1 - t, t
    omega = math.acos(cos)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
