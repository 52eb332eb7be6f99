"""The contract between a merge technique and the streaming engine, and the checks its hyperparameters share.

A technique is a frozen dataclass: its fields are its hyperparameters (so ``dataclasses.fields`` is the schema that
``validate`` and ``--help`` show). The engine runs three kinds of kernel:

- element-wise, :meth:`Technique.merge_chunk`: maps a ``chunks.Chunk`` (a slice of one tensor across the base and
  every expert, read in float32) to the merged slice, reducing over experts in store order, one expert at a time, so
  the engine needs memory for a few chunks whatever the number of experts (task arithmetic, TIES, ...);
- whole-matrix, ``spectral.SpectralTechnique.merge_matrix``: receives one matrix of every expert at a time (read
  whole on demand), for methods built on per-matrix SVDs (TSV, Iso-C, Iso-CTS); memory is bounded by the largest
  matrix times the number of experts, not by the model;
- sequential, :meth:`SequentialTechnique.step`: folds one expert into a running merge and returns the state to carry
  to the next step (OPCM), so a TIME run merges each new expert once instead of re-merging all of them.

An element-wise technique whose merge over experts 1..t is a left fold of per-entry running state (sums, sign
counts, the running maximum; SLERP's running fold per tensor) is ``incremental``: it says what the state is
(:meth:`Technique.state_fields`), what each expert adds (:meth:`Technique.contributions`), how it is added
(:meth:`Technique.fold`) and how the merge is read off (:meth:`Technique.finish`). Its :meth:`Technique.merge_chunk`
is those four steps over every expert, and ``engine.update`` is the same steps over the state on disk and the new
experts only, so an `all` protocol's boundary reads one expert whatever t is and gives the full merge's bits.

Every kind gives the same bits whether its inputs were files or state dicts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch

if TYPE_CHECKING:
    from timelit.merging.chunks import Chunk, TensorJob
    from timelit.merging.running import Running
    from timelit.merging.sources import Source

Scope = Literal["model", "tower", "tensor"]
"""Over which entries a global statistic (a trim threshold, the majority sign, LiNeS' auto alpha) is taken:
``model`` = every merged entry (the TIES paper), ``tower`` = the visual tower (keys ``visual.*``) and the text tower
(every other key, ``logit_scale`` included) separately, as the FoMo-in-Flux pipeline merges them, ``tensor`` = each
tensor on its own (mergekit)."""


@dataclass(frozen=True)
class Elected:
    """TIES' merged task vector for one chunk, before the scope's majority sign is known.

    ``tau`` holds the disjoint mean wherever the elected sign is +1 or -1 and 0 where the trimmed values sum to exactly
    0. Where such a zero-sum position still holds nonzero entries (they cancel), TIES gives it the scope's majority
    sign, known only after the whole scope is seen: those ``undecided`` positions (chunk offsets) carry both
    candidate values, ``pos_mean`` and ``neg_mean``, and the engine patches them at the end of the scope: with
    ``pos_mean`` when the scope's sum of elected signs is positive, ``neg_mean`` when negative, and 0 when that sum is
    0 as well (symmetric; the reference code takes ``neg_mean`` there, see ``ties``).
    """

    tau: torch.Tensor
    sign_sum: int
    undecided: torch.Tensor
    pos_mean: torch.Tensor
    neg_mean: torch.Tensor


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raise a ValueError naming the valid choices and the nearest one when ``value`` is not among ``choices``."""
    if value not in choices:
        near = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(choices)}.{hint}")


def check_scope_has_effect(technique: str, scope: str, used: bool, auto_name: str) -> None:
    """Reject a non-default ``scope`` where it changes nothing, as ``lam`` is rejected under LiNeS.

    A technique that merges entry by entry (task arithmetic, DARE's i.i.d. masks, LiNeS with a fixed alpha) takes no
    statistic over a scope, so ``scope="tower"`` there would read as a choice that was never applied. ``used`` says
    whether this configuration takes one; ``auto_name`` is the hyperparameter whose ``"auto"`` value would.
    """
    if scope != "model" and not used:
        raise ValueError(
            f"scope={scope!r} has no effect on {technique}: it merges entry by entry and takes no statistic over a "
            f"scope (scope only decides where {auto_name}='auto' is computed); leave scope unset"
        )


def check_range(
    name: str, value: object, low: float = -math.inf, high: float = math.inf, *, high_open: bool = False
) -> float:
    """``value`` as a float in ``[low, high]`` (``[low, high)`` when ``high_open``; any finite number by default),
    else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not (low <= value < high if high_open else low <= value <= high):
        raise ValueError(f"{name}={value} is outside [{low}, {high}{')' if high_open else ']'}")
    return float(value)


@dataclass(frozen=True)
class Range:
    """A hyperparameter's valid interval: ``[low, high]``, or ``[low, high)`` when ``high_open``."""

    low: float = -math.inf
    high: float = math.inf
    high_open: bool = False


FINITE = Range()
"""Any finite number (a lambda)."""
UNIT = Range(0.0, 1.0)
"""A fraction or weight in [0, 1]."""
UNIT_OPEN = Range(0.0, 1.0, high_open=True)
"""A fraction in [0, 1), where 1 would divide by zero or drop everything."""


@dataclass(frozen=True)
class Scaling:
    """How a merged task vector is added to the base: per key ``alpha + beta * depth_ratio(key)``.

    Without LiNeS, ``alpha`` is lambda and ``beta`` is 0. ``alpha="auto"`` is LiNeS' multi-task choice, computed by
    the engine per scope once the merged task vector is known (``lines.auto_alpha``).
    """

    alpha: float | Literal["auto"] = 1.0
    beta: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Technique:
    """Base of every merge technique. Fields are hyperparameters; subclasses implement :meth:`merge_chunk`.

    Args:
        skip: key patterns (``fnmatch``) copied from the base instead of merged, e.g. ``["logit_scale"]``; empty by
            default, so every floating tensor is merged, as the FoMo-in-Flux pipeline does.
    """

    skip: tuple[str, ...] = ()

    name: ClassVar[str]
    """The method name under which ``merging.TECHNIQUES`` registers the technique."""
    space: ClassVar[Literal["weights", "task"]] = "task"
    """``weights``: the kernel returns merged weights; ``task``: a merged task vector, added to the base with
    :meth:`scaling`."""
    experts_allowed: ClassVar[tuple[int, int | None]] = (1, None)
    order_statistics: ClassVar[bool] = False
    hints: ClassVar[dict[str, str]] = {}
    """Explanations for hyperparameter names from other code bases, shown when a user passes one."""
    incremental: ClassVar[bool] = False
    """Whether the merge over experts 1..t is running state updated with expert t alone (``engine.update``); the
    module docstring of a technique that is not says why."""
    aliases: ClassVar[dict[str, str]] = {}
    """Other names ``validate`` accepts for a field (alias -> field), e.g. MERGING.md's Breadcrumbs ``beta``."""
    ranges: ClassVar[dict[str, Range]] = {}
    """Numeric fields and their valid range, checked by ``__post_init__`` with :func:`check_range`; a field that may
    also hold ``None`` or a word (``"auto"``) is checked by its technique instead."""

    def __post_init__(self) -> None:
        skip = (self.skip,) if isinstance(self.skip, str) else self.skip
        if not isinstance(skip, (list, tuple)) or not all(isinstance(pattern, str) for pattern in skip):
            raise ValueError(f"skip must be a list of key patterns, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(skip))
        for field_name, bounds in self.ranges.items():
            check_range(field_name, getattr(self, field_name), bounds.low, bounds.high, high_open=bounds.high_open)

    def check_experts(self, n: int) -> None:
        low, high = self.experts_allowed
        if n < low or (high is not None and n > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ValueError(f"{self.name} merges {wanted} experts, got {n}")

    def ranks(self, n: int) -> tuple[int, ...]:
        """Which order statistics of ``|tau_i|`` (rank 1 = the largest, 0 = none) the kernel needs per expert,
        over a scope of ``n`` entries; the engine computes them exactly and passes them as ``chunk.thresholds``."""
        return ()

    def scaling(self) -> Scaling:
        return Scaling()

    def merge_tensor(self, job: TensorJob) -> Iterator[tuple[Chunk, torch.Tensor | Elected]]:
        """Merge one tensor chunk by chunk; techniques that need a whole-tensor statistic (SLERP, model stock) override
        this."""
        for chunk in job.chunks():
            yield chunk, self.merge_chunk(chunk)

    def merge_chunk(self, chunk: Chunk) -> torch.Tensor | Elected:
        """The merged slice (weights or task vector, see :attr:`space`). It may live in a workspace buffer
        (``chunk.buffer("result")``): the engine uses it up before it asks for the next chunk.

        An incremental technique folds every expert's contribution into its state and finishes it."""
        fields = self.state_fields()
        if not fields:
            raise NotImplementedError
        state = {field: chunk.buffer(buffer) for field, buffer in fields.items()}
        for i, contribution in enumerate(self.contributions(chunk, 0)):
            self.fold(state, contribution, i == 0, chunk)
        return self.finish(state, chunk)

    # The running state of an incremental technique (see the module docstring).

    def state_fields(self) -> dict[str, str]:
        """Per merged entry, the float32 fields of the running state, each mapped to the workspace buffer that holds
        it while a chunk is merged; empty for a technique that is not incremental."""
        return {}

    def contributions(self, chunk: Chunk, first: int) -> Iterator[torch.Tensor]:
        """What each of the chunk's experts folds into the state, in store order (its task vector, trimmed or
        masked: each overwrites the previous one); ``first`` is the store index of the chunk's first expert, on
        which seeded masks depend."""
        return chunk.task_vectors()

    def fold(self, state: dict[str, torch.Tensor], contribution: torch.Tensor, first: bool, chunk: Chunk) -> None:
        """Add one expert's contribution to the state in place (scratch buffers from ``chunk``); ``first``: the state
        holds nothing yet and is initialised from it (not zeroed and added to, which could differ, e.g. -0.0)."""
        raise NotImplementedError

    def finish(self, state: dict[str, torch.Tensor], chunk: Chunk) -> torch.Tensor | Elected:
        """The merged slice read off the state; it may overwrite the state's buffers."""
        raise NotImplementedError

    def update_tensor(self, job: TensorJob, running: Running) -> Iterator[tuple[Chunk, torch.Tensor | Elected]]:
        """:meth:`merge_tensor` for ``engine.update``: the job's experts are the new ones; each chunk's state is
        read from the previous state file, the new contributions are folded in, and the state is written to the
        next file before it is finished."""
        fields = self.state_fields()
        for chunk in job.chunks():
            state = running.load(chunk, fields)
            for i, contribution in enumerate(self.contributions(chunk, running.folded)):
                self.fold(state, contribution, running.folded + i == 0, chunk)
            running.store(chunk, state)
            yield chunk, self.finish(state, chunk)

    def hparams(self, n_experts: int | None = None) -> dict[str, Any]:
        """The hyperparameters the merge used, as plain values (the provenance in a merged file's metadata).

        Defaults left unset (``None``) are recorded as the values they resolve to, e.g. ``lam: 1.0``, so the record
        says what was computed; subclasses resolve their own. ``n_experts`` resolves what depends on the experts
        (uniform average weights, SLERP's ``t``). Passed back to ``validate``, the record rebuilds the same merge.
        """
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}


@dataclass(frozen=True, kw_only=True)
class TaskVectorTechnique(Technique):
    """A technique that merges task vectors into tau_m and returns theta_0 + lam * tau_m, or LiNeS-scaled.

    Args:
        lam: lambda, the scale of the merged task vector (default 1, as in the papers' definitions and the TIME
            configs; task arithmetic's paper tunes 0.3-0.4 for 8 tasks). Not allowed with ``lines=True``.
        scope: where global statistics are taken (see :data:`Scope`); default ``model`` as in the papers. Task
            arithmetic and ``dare`` take none, so there another scope is an error unless ``lines_alpha="auto"``.
        lines: scale tau_m by depth with LiNeS (arXiv 2410.17146) instead of lambda.
        lines_alpha: LiNeS alpha (default 0.5, the pipeline's), or ``"auto"`` = ||sum tau_i||_1 / (N ||tau_m||_1).
        lines_beta: LiNeS beta (default 0.5).
    """

    lam: float | None = None
    scope: Scope = "model"
    lines: bool = False
    lines_alpha: float | Literal["auto"] | None = None
    lines_beta: float | None = None

    scoped: ClassVar[bool] = False
    """Whether the technique itself takes a statistic over the scope (a trim threshold, the majority sign). Where
    it does not, ``scope`` matters only for ``lines_alpha="auto"`` and is rejected otherwise."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("scope", self.scope, get_args(Scope))
        if not isinstance(self.lines, bool):
            raise ValueError(f"lines must be true or false, got {self.lines!r}")
        if self.lines and self.lam is not None:
            raise ValueError("lam has no effect with lines=True: the LiNeS scale replaces lambda (arXiv 2410.17146)")
        if not self.lines and (self.lines_alpha is not None or self.lines_beta is not None):
            raise ValueError("lines_alpha and lines_beta need lines=True")
        if self.lam is not None:
            check_range("lam", self.lam)
        if self.lines_alpha is not None and self.lines_alpha != "auto":
            check_range("lines_alpha", self.lines_alpha)
        if self.lines_beta is not None:
            check_range("lines_beta", self.lines_beta)
        check_scope_has_effect(self.name, self.scope, self.scoped or self.scaling().alpha == "auto", "lines_alpha")

    def scaling(self) -> Scaling:
        if self.lines:
            alpha = 0.5 if self.lines_alpha is None else self.lines_alpha
            beta = 0.5 if self.lines_beta is None else float(self.lines_beta)
            return Scaling(alpha if alpha == "auto" else float(alpha), beta)
        return Scaling(1.0 if self.lam is None else float(self.lam))

    def hparams(self, n_experts: int | None = None) -> dict[str, Any]:
        """As :meth:`Technique.hparams`, with the scale that was applied: ``lam`` (default 1.0), or with LiNeS
        ``lines_alpha`` and ``lines_beta`` (default 0.5 each). The other one is left out: it had no effect, and
        recorded it would be rejected when the record is passed back to ``validate``."""
        values = super().hparams(n_experts)
        scaling = self.scaling()
        if self.lines:
            del values["lam"]
            values["lines_alpha"], values["lines_beta"] = scaling.alpha, scaling.beta
        else:
            del values["lines_alpha"], values["lines_beta"]
            values["lam"] = scaling.alpha
        return values


MergeState = dict[str, Any]
"""What a sequential technique carries from one step to the next: plain numbers (JSON and checkpoint safe)."""


@dataclass(frozen=True)
class FoldStep:
    """One step of a sequential merge: fold ``expert`` into ``previous`` (the merge so far, whose state is ``state``;
    both ``None`` before the first expert), for the tensors ``keys``."""

    base: Source
    previous: Source | None
    expert: Source
    keys: Sequence[str]
    state: Mapping[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class SequentialTechnique(Technique):
    """A technique that folds experts into a running merge one at a time, carrying a small state between steps.

    ``merge(base, experts, method)`` folds every expert in store order from an empty merge (state ``None``);
    ``merging.merge_step`` runs one step, which is how a TIME protocol merges the newest expert into the previous
    task's merged weights. Both run :meth:`step` on the same numbers, so a run that carries the state gives the
    same bits as a fold over all its experts.
    """

    space: ClassVar = "weights"

    def step(self, fold: FoldStep) -> tuple[dict[str, torch.Tensor], MergeState | None]:
        """The merged tensors of ``fold.keys`` in the base's dtypes, and the state after the step."""
        raise NotImplementedError
