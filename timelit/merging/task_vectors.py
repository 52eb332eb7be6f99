"""Steps shared by the task-vector techniques: summing in store order, TIES' sign election, scope groups.

Task vectors tau_i = theta_i - theta_0 are formed in float32 by :meth:`Chunk.task_vectors`. Every reduction over
experts here folds one expert at a time in store order (oldest first), so a chunk of the merge needs a few chunk-sized
accumulators whatever the number of experts, and its bits do not depend on how a tensor was cut into chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from timelit.merging.technique import Scope


def sum_in_order(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum_i tensors[i], accumulated in float32 in the given order (task arithmetic, arXiv 2212.04089 eq. 1)."""
    total: torch.Tensor | None = None
    for tensor in tensors:
        total = torch.zeros_like(tensor) if total is None else total
        total += tensor  # a plain add, never a fused multiply-add, so every chunking rounds alike
    if total is None:
        raise ValueError("nothing to sum: no experts")
    return total


@dataclass(frozen=True)
class Elected:
    """TIES' merged task vector for one chunk, before the scope's majority sign is known.

    ``tau`` holds the disjoint mean wherever the elected sign is +1 or -1 and 0 where the trimmed values sum to exactly
    0. Where such a zero-sum position still holds nonzero entries (they cancel), TIES gives it the scope's majority
    sign, known only after the whole scope is seen: those ``undecided`` positions (chunk offsets) carry both
    candidate values, ``pos_mean`` and ``neg_mean``, and the engine patches them at the end of the scope.
    """

    tau: torch.Tensor
    sign_sum: int
    undecided: torch.Tensor
    pos_mean: torch.Tensor
    neg_mean: torch.Tensor


def elect_disjoint_mean(trimmed: Iterable[torch.Tensor]) -> Elected:
    """TIES steps 2-3 (arXiv 2306.01708 Alg. 1): elect a sign by mass, average the entries that agree with it.

    The elected sign is sign(sum_i tau_i), with the sum taken as (sum of positive entries) + (sum of negative
    entries), each accumulated in store order. The disjoint mean divides by the number of nonzero agreeing entries
    (at least 1), as the reference code and the FoMo-in-Flux pipeline do. Experts are folded one at a time, keeping
    five accumulators instead of an N x chunk stack.
    """
    pos_sum = neg_sum = pos_count = neg_count = None
    for tau in trimmed:
        if pos_sum is None:
            pos_sum, neg_sum = torch.zeros_like(tau), torch.zeros_like(tau)
            pos_count = torch.zeros(tau.shape, dtype=torch.int32)
            neg_count = torch.zeros(tau.shape, dtype=torch.int32)
        positive, negative = tau > 0, tau < 0
        pos_sum += torch.where(positive, tau, 0.0)
        neg_sum += torch.where(negative, tau, 0.0)
        pos_count += positive
        neg_count += negative
    if pos_sum is None:
        raise ValueError("nothing to elect: no experts")
    total = pos_sum + neg_sum
    pos_mean = pos_sum / pos_count.clamp(min=1)
    neg_mean = neg_sum / neg_count.clamp(min=1)
    up, down = total > 0, total < 0
    tau = torch.where(up, pos_mean, torch.where(down, neg_mean, 0.0))
    undecided = (~up & ~down & ((pos_count > 0) | (neg_count > 0))).nonzero().squeeze(1)
    sign_sum = int(up.sum()) - int(down.sum())
    return Elected(tau, sign_sum, undecided, pos_mean[undecided], neg_mean[undecided])


def scope_groups(keys: Sequence[str], scope: Scope) -> list[tuple[str, list[str]]]:
    """Split the merged keys into the groups over which global statistics are taken, in the keys' order.

    ``tower`` puts keys starting with ``visual.`` in the visual tower and every other key (token embedding,
    positional embedding, text transformer, ``ln_final``, ``text_projection``, ``logit_scale``) in the text tower,
    as the FoMo-in-Flux pipeline's ``backbone`` and ``head`` merges do.
    """
    if scope == "model":
        return [("model", list(keys))] if keys else []
    if scope == "tensor":
        return [(key, [key]) for key in keys]
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault("visual" if key.startswith("visual.") else "text", []).append(key)
    return list(groups.items())
