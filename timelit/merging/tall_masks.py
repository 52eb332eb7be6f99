"""TALL masks / consensus merging: keep the task-arithmetic sum only where enough experts need it (Wang et al.,
"Localizing Task Information for Improved Model Merging and Compression", arXiv 2405.07813, eq. 3-4 and §4).

    merge(base, experts, "tall_masks")                                # mask_lambda 0.4, min_agree 2
    merge(base, experts, "tall_masks", min_agree=0)                   # every mask is one: task arithmetic

With tau_i = theta_i - theta_0 and the multi-task vector tau_s = sum_i tau_i:

    mask_i    = |tau_i| > mask_lambda * |tau_s - tau_i|     (expert i's TALL mask: where tau_i stands out of the sum)
    consensus = (sum_i mask_i >= min_agree)                  (entries that at least min_agree experts claim)
    theta     = theta_0 + lam * tau_s * consensus

Entries claimed by one expert only ("selfish" weights) or by none ("catastrophic" ones) are dropped at min_agree 2,
the paper's choice and this default. The FoMo-in-Flux pipeline's default threshold 0 makes every mask one, i.e. plain
task arithmetic, and its comparison uses |theta_0 - theta_i| for |tau_i| (FusionBench's algorithm class has the same
slip; its ``generate_task_masks`` is right). The strict ``>`` (MERGING.md) means an expert whose task vector is 0 at
an entry never claims it. Everything is element-wise, so scope does not apply (as for task arithmetic) and the result
does not depend on chunking; the kernel reads every expert twice per chunk (once for tau_s, once for the masks).

Not incremental: expert i's mask compares |tau_i| with |tau_s - tau_i| for the final sum tau_s, so an `all` protocol
reads every expert again at each boundary (min_agree 0 is task arithmetic, which is incremental).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from timelit.merging.chunks import Chunk
from timelit.merging.task_vectors import sum_in_order
from timelit.merging.technique import TaskVectorTechnique, check_range

CONSENSUS_HINTS = {
    "tall_mask_lambda": "the TALL mask's lambda is `mask_lambda`",
    "scaling_factor": "the pipeline's scaling_factor is `lam`",
}


def check_consensus(technique: str, mask_lambda: object, min_agree: object) -> None:
    """The shared checks of ``mask_lambda`` (finite, >= 0) and ``min_agree`` (a non-negative integer)."""
    check_range("mask_lambda", mask_lambda, 0.0)
    if isinstance(min_agree, bool) or not isinstance(min_agree, int) or min_agree < 0:
        raise ValueError(f"{technique}: min_agree must be a non-negative number of experts, got {min_agree!r}")


def check_agreement_possible(technique: str, min_agree: int, n: int) -> None:
    """A consensus that more experts must reach than there are would drop every entry: say so instead."""
    if min_agree > n:
        raise ValueError(
            f"{technique} with min_agree={min_agree} needs at least {min_agree} experts to keep anything, got {n}; "
            f"lower min_agree (0 = task arithmetic)"
        )


def consensus_drop(chunk: Chunk, mask_lambda: float, min_agree: int, total: torch.Tensor) -> torch.Tensor:
    """The entries outside the consensus, ``sum_i mask_i < min_agree``, as a bool buffer; ``total`` must hold
    tau_s = sum_i tau_i of the chunk. Expert masks are folded into a count one expert at a time."""
    count, claims = chunk.buffer("tall.count", torch.int32), chunk.buffer("tall.claims", torch.bool)
    distance = chunk.buffer("tall.distance")
    for i, tau in enumerate(chunk.task_vectors()):
        torch.sub(total, tau, out=distance).abs_().mul_(mask_lambda)
        torch.gt(tau.abs_(), distance, out=claims)
        if i == 0:
            count.copy_(claims)
        else:
            count += claims
    return torch.lt(count, min_agree, out=claims)


@dataclass(frozen=True, kw_only=True)
class Consensus:
    """The TALL consensus's hyperparameters and their checks, mixed into a technique before its base class (as
    :class:`TallMasks` and ``consensus_ties.ConsensusTies`` are), whose docstring documents them."""

    mask_lambda: float = 0.4
    min_agree: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        check_consensus(self.name, self.mask_lambda, self.min_agree)  # type: ignore[attr-defined]

    def check_experts(self, n: int) -> None:
        super().check_experts(n)  # type: ignore[misc]
        check_agreement_possible(self.name, self.min_agree, n)  # type: ignore[attr-defined]


@dataclass(frozen=True, kw_only=True)
class TallMasks(Consensus, TaskVectorTechnique):
    """Consensus merging of the task-arithmetic sum; lam, scope and LiNeS as in :class:`TaskVectorTechnique`.

    Args:
        mask_lambda: the TALL mask's lambda (the paper tunes it per task in [0.2, 0.6]; default 0.4). Larger keeps
            fewer entries per expert.
        min_agree: how many experts' masks must hold an entry for it to be kept (default 2, the paper's; 0 keeps
            every entry, which is task arithmetic). More than the number of experts is an error at merge time.
    """

    name: ClassVar[str] = "tall_masks"
    hints: ClassVar[dict[str, str]] = CONSENSUS_HINTS

    def merge_chunk(self, chunk: Chunk) -> torch.Tensor:
        total = sum_in_order(chunk.task_vectors(), out=chunk.buffer("result"))
        if self.min_agree == 0:  # every count is >= 0: skip the second read of the experts
            return total
        return total.masked_fill_(consensus_drop(chunk, self.mask_lambda, self.min_agree, total), 0.0)
