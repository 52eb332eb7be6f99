"""Steps shared by the task-vector techniques: summing in store order, TIES' sign election, scope groups.

Task vectors tau_i = theta_i - theta_0 are formed in float32 by :meth:`Chunk.task_vectors`. Every reduction over
experts here folds one expert at a time in store order (oldest first), so a chunk of the merge needs a few chunk-sized
accumulators whatever the number of experts, and its bits do not depend on how a tensor was cut into chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from timelit.merging.technique import Elected, Scope

if TYPE_CHECKING:
    from timelit.merging.chunks import Chunk


def sum_in_order(tensors: Iterable[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """sum_i tensors[i] into ``out``, accumulated in float32 in the given order (task arithmetic, arXiv
    2212.04089 eq. 1)."""
    empty = True
    for tensor in tensors:
        fold_sum(out, tensor, empty)
        empty = False
    if empty:
        raise ValueError("nothing to sum: no experts")
    return out


def fold_sum(total: torch.Tensor, tensor: torch.Tensor, first: bool) -> None:
    """One step of :func:`sum_in_order`: the running sum starts as a copy of the first term."""
    if first:
        total.copy_(tensor)
    else:
        total += tensor  # a plain add, never a fused multiply-add, so every chunking rounds alike


SUM_FIELDS = {"sum": "result"}
ELECT_FIELDS = {"pos_sum": "elect.ps", "neg_sum": "elect.ns", "pos_count": "elect.pc", "neg_count": "elect.nc"}


class Summed:
    """Mixin of an incremental technique whose merged task vector is the float32 sum of its contributions in store
    order (task arithmetic, DARE, Breadcrumbs, LiNeS): the running state is that sum."""

    incremental: ClassVar[bool] = True

    def state_fields(self) -> dict[str, str]:
        return SUM_FIELDS

    def fold(self, state: dict[str, torch.Tensor], contribution: torch.Tensor, first: bool, chunk: Chunk) -> None:
        fold_sum(state["sum"], contribution, first)

    def finish(self, state: dict[str, torch.Tensor], chunk: Chunk) -> torch.Tensor:
        return state["sum"]


class SignElected:
    """Mixin of an incremental technique that elects signs and takes the disjoint mean of its contributions (TIES,
    DARE-TIES, Breadcrumbs-TIES): the running state is :func:`elect_disjoint_mean`'s four accumulators. Each
    expert's trim threshold depends on that expert alone, so the trimmed values of earlier experts are final."""

    incremental: ClassVar[bool] = True

    def state_fields(self) -> dict[str, str]:
        return ELECT_FIELDS

    def fold(self, state: dict[str, torch.Tensor], contribution: torch.Tensor, first: bool, chunk: Chunk) -> None:
        fold_elect(state, contribution, first, chunk.buffer("elect.part"))

    def finish(self, state: dict[str, torch.Tensor], chunk: Chunk) -> Elected:
        return finish_elect(state, chunk)


def keep_magnitudes(chunk: Chunk, bounds: Iterable[tuple[float, float]]) -> Iterator[torch.Tensor]:
    """tau_i of the chunk with, in place, the entries whose magnitude lies outside ``[lower_i, upper_i]`` zeroed
    (the trim of TIES and of Breadcrumbs; entries equal to a bound are kept)."""
    magnitude = chunk.buffer("trim.magnitude")
    outside, above = chunk.buffer("trim.outside", torch.bool), chunk.buffer("trim.above", torch.bool)
    for tau, (lower, upper) in zip(chunk.task_vectors(), bounds, strict=True):
        torch.abs(tau, out=magnitude)
        torch.lt(magnitude, lower, out=outside)
        if upper != math.inf:
            outside |= torch.gt(magnitude, upper, out=above)
        yield tau.masked_fill_(outside, 0.0)


def elect_disjoint_mean(chunk: Chunk, trimmed: Iterable[torch.Tensor]) -> Elected:
    """TIES steps 2-3 (arXiv 2306.01708 Alg. 1): elect a sign by mass, average the entries that agree with it.

    The elected sign is sign(sum_i tau_i), with the sum taken as (sum of positive entries) + (sum of negative
    entries), each accumulated in store order. The disjoint mean divides by the number of nonzero agreeing entries
    (at least 1), as the reference code and the FoMo-in-Flux pipeline do. Experts are folded one at a time into
    four accumulators (counts kept as floats, exact up to 2^24 experts) instead of an N x chunk stack.

    Where the sum is exactly 0 the elected sign is the scope's majority, unknown until the scope is done: the result
    holds 0 there and :class:`Elected` carries both candidates. A majority of 0 leaves the 0 (no side wins), where
    the reference code would take the negative side's mean.
    """
    state = {field: chunk.buffer(buffer) for field, buffer in ELECT_FIELDS.items()}
    part = chunk.buffer("elect.part")
    for i, tau in enumerate(trimmed):
        fold_elect(state, tau, i == 0, part)
    return finish_elect(state, chunk)


def fold_elect(state: dict[str, torch.Tensor], tau: torch.Tensor, first: bool, part: torch.Tensor) -> None:
    """One expert of :func:`elect_disjoint_mean` folded into its accumulators (``part``: scratch)."""
    pos_sum, neg_sum, pos_count, neg_count = (state[field] for field in ELECT_FIELDS)
    if first:  # initialise the accumulators from the first expert rather than zeroing and adding
        torch.sign(torch.clamp(tau, min=0, out=pos_sum), out=pos_count)
        torch.sign(torch.clamp(tau, max=0, out=neg_sum), out=neg_count).neg_()
        return
    pos_sum += torch.clamp(tau, min=0, out=part)
    pos_count += part.sign_()
    neg_sum += torch.clamp(tau, max=0, out=part)
    neg_count -= part.sign_()


def finish_elect(state: dict[str, torch.Tensor], chunk: Chunk) -> Elected:
    """The elected signs and disjoint means of :func:`elect_disjoint_mean` from its accumulators (overwritten)."""
    pos_sum, neg_sum, pos_count, neg_count = (state[field] for field in ELECT_FIELDS)
    total = torch.add(pos_sum, neg_sum, out=chunk.buffer("elect.total"))
    # A zero sum over nonzero entries: they cancel (positive entries cannot sum to 0, so pos_sum > 0 detects them).
    undecided = ((total == 0) & (pos_sum > 0)).nonzero().squeeze(1)
    pos_mean, neg_mean = pos_sum.div_(pos_count.clamp_(min=1)), neg_sum.div_(neg_count.clamp_(min=1))
    sign = total.sign_()
    tau = torch.where(sign > 0, pos_mean, neg_mean, out=chunk.buffer("result")).masked_fill_(sign == 0, 0.0)
    sign_sum = int(sign.sum(dtype=torch.float64))
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
