"""Model stock: interpolate the experts' mean toward the base by their angle, per tensor (Jang et al., "Model
Stock: All we need is just a few fine-tuned models", arXiv 2403.19522: the ratio for two models and its N-model form).

    merge(base, experts, "model_stock")                    # no hyperparameters
    timelit fit --config quickstart.yaml --config protocols/ema_ema_model_stock.yaml

Fine-tuned weights lie near a sphere around their centre; the paper finds the point closest to that centre on the
span of the base and the experts' mean. Per tensor, with tau_i = theta_i - theta_0:

    cos = mean over pairs i < j of cos(tau_i, tau_j)
    t   = N cos / (1 + (N - 1) cos)
    theta = t * mean_i(theta_i) + (1 - t) * theta_0

The mean of the pairwise cosines, as MERGING.md fixes it (FusionBench averages the angles instead; the two agree at
N = 2). Experts whose task vector on the tensor is exactly zero (an expert equal to theta_0, as the older model of
the first EMA step is) are dropped first, and N counts the rest: one left gives that expert, none gives theta_0. The
FoMo-in-Flux pipeline instead takes exactly two models and, once one of them is theta_0, returns theta_0 forever
(FIF_REFERENCE.md §1). Where the unit task vectors cancel exactly (1 + (N - 1) cos = 0, e.g. tau_2 = -tau_1) the
formula has no value; timelit returns theta_0 there (a documented choice: no direction is agreed on).

The angle is a whole-tensor statistic, so the kernel runs three passes over the tensor's chunks, each folding the
experts one at a time (no expert stack, as the engine requires), with float64 sums taken chunk by chunk in order
(so, as for SLERP, the bits may depend on the chunk size, never on files versus state dicts):
1. ||tau_i||^2 per expert;
2. S = ||sum_i tau_i / ||tau_i|| ||^2, which gives the mean cosine without an N x N Gram matrix:
   S = N + 2 sum_{i<j} cos(tau_i, tau_j), so cos = (S - N) / (N (N - 1)) and 1 + (N - 1) cos = S / N;
3. theta = sum_i (t / N) theta_i + (1 - t) theta_0 in float64, rounded once to float32 (as ``average`` does), so a
   merge of identical experts (cos = 1, t = 1) returns them exactly.

Not incremental: the norms and the sum of unit task vectors could be carried, but the final combination weights every
expert by t/N, which changes with N, so an `all` protocol reads every expert again at each boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from timelit.merging.chunks import Chunk, TensorJob
from timelit.merging.technique import Technique


def ratio(cos: float, n: int) -> float:
    """t = N cos / (1 + (N - 1) cos) (arXiv 2403.19522; 2 cos / (1 + cos) for two models); 0 (theta_0) where the
    denominator is not positive, which happens only when the unit task vectors sum to (nearly) zero."""
    denominator = 1 + (n - 1) * cos
    return n * cos / denominator if denominator > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class ModelStock(Technique):
    """Model stock over N >= 2 experts, per tensor; it has no hyperparameters besides ``skip``."""

    name: ClassVar[str] = "model_stock"
    space: ClassVar = "weights"
    experts_allowed: ClassVar = (2, None)
    hints: ClassVar[dict[str, str]] = {
        "eps": "timelit's model stock needs no eps: zero task vectors are dropped before the angle is taken"
    }

    def merge_tensor(self, job: TensorJob) -> Iterator[tuple[Chunk, torch.Tensor]]:
        """Three passes over the tensor, each with fresh chunks: a chunk's base lives in a buffer that the next
        chunk's read overwrites."""
        norms = [math.sqrt(square) for square in _squared_norms(job.chunks(), len(job.experts))]
        kept = [i for i, norm in enumerate(norms) if norm > 0]
        if len(kept) < 2:  # no angle: the one expert left, or theta_0
            for chunk in job.chunks():
                yield chunk, chunk.buffer("result").copy_(chunk.expert(kept[0]) if kept else chunk.base)
            return
        n = len(kept)
        cos = (_unit_sum_square(job.chunks(), kept, [norms[i] for i in kept]) - n) / (n * (n - 1))
        t = ratio(cos, n)
        for chunk in job.chunks():
            yield chunk, _combine(chunk, kept, t / n, 1 - t)


def _squared_norms(chunks: Iterable[Chunk], n_experts: int) -> list[float]:
    """||tau_i||^2 over the tensor per expert, in float64 (exact zero iff tau_i is zero: squares of float32 values
    do not underflow in float64)."""
    squares = [0.0] * n_experts
    for chunk in chunks:
        wide = chunk.buffer("model_stock.wide", torch.float64)
        for i, tau in enumerate(chunk.task_vectors()):
            wide.copy_(tau)
            squares[i] += float(torch.dot(wide, wide))
    return squares


def _unit_sum_square(chunks: Iterable[Chunk], kept: Sequence[int], norms: Sequence[float]) -> float:
    """S = ||sum_i tau_i / ||tau_i|| ||^2 over the tensor, in float64."""
    total = 0.0
    for chunk in chunks:
        unit_sum, term = chunk.buffer("model_stock.sum", torch.float64), chunk.buffer("model_stock.wide", torch.float64)
        for j, (i, norm) in enumerate(zip(kept, norms, strict=True)):
            target = unit_sum if j == 0 else term
            target.copy_(chunk.task_vector(i)).div_(norm)
            if j:
                unit_sum += term
        total += float(torch.dot(unit_sum, unit_sum))
    return total


def _combine(chunk: Chunk, kept: Sequence[int], expert_weight: float, base_weight: float) -> torch.Tensor:
    """sum_i w theta_i + w_0 theta_0 over the kept experts, in float64, rounded once (see ``average.weighted_sum``
    for why: a plain add of separately rounded products, so no bit depends on vectorisation)."""
    total, term = chunk.buffer("model_stock.sum", torch.float64), chunk.buffer("model_stock.wide", torch.float64)
    total.copy_(chunk.base).mul_(base_weight)
    for i in kept:
        total += term.copy_(chunk.expert(i)).mul_(expert_weight)
    return chunk.buffer("result").copy_(total)
