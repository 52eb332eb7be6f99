"""TIME protocols as pure rules: which weights start a task, which are deployed after it, what a boundary merges.

    python -m pytest tests/unit/test_protocol.py tests/integration/test_time_merge.py -q

TIME (arXiv 2412.06712, §3) separates *initialization* of the next expert from *deployment* after a task:

    init    zs      the zero-shot base weights θ0
            ft      the last expert θ_{t-1}
            ema     the task-level EMA m_{t-1}, m_t = f([m_{t-1}, θ_t]) from m_0 = θ0
            all     a merge of the base with every expert so far
            ft_zs   the last expert merged with the base, f([θ0, θ_{t-1}]) (the pipeline's FT-Merge, `ft_paint`)
    deploy  ft, ema, all, ft_zs   the same quantities after the task (with θ_t included)

f is the protocol's merge technique. `ProtocolSettings` holds a protocol; `init_weights`, `deployed_weights` and
`boundary_plan` decide from it and a task index which stored weights a task starts from, which are deployed, and what
a boundary merges; `realise` computes one planned merge. Nothing here knows Lightning: `TimeMerge`
(timelit/training/callbacks/time_merge.py) calls these at its hooks, and `timelit.merging.merged_files` names and keeps
the files. docs/ARCHITECTURE.md ("The task boundary in O(1)", "Decisions" 6) has the design and the pipeline's names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import torch

from timelit.merging import (
    TECHNIQUES,
    MergeMethod,
    MergeState,
    SequentialTechnique,
    load_weights,
    merge,
    merge_step,
    validate,
)
from timelit.merging.engine import state_members, update
from timelit.merging.running import HPARAMS_KEY, TECHNIQUE_KEY, hparams_record
from timelit.merging.sources import IncompatibleWeightsError, MemorySource, merged_keys
from timelit.utilities.errors import UserError

Init = Literal["zs", "ft", "ema", "all", "ft_zs"]
Deploy = Literal["ft", "ema", "all", "ft_zs"]
EmaStart = Literal["base", "first_expert"]
Weighting = Literal[
    "uniform", "linear", "sqrt", "quadratic", "cubic", "fifth", "tenth", "exp", "log",
    "reverse_linear", "reverse_sqrt", "reverse_quadratic", "reverse_cubic", "reverse_fifth", "reverse_tenth",
    "reverse_exp", "reverse_log",
]  # fmt: skip
StateDict = Mapping[str, torch.Tensor]
WeightsLike = StateDict | str

_PAIR_WEIGHT = {"interpolation": "w", "slerp": "t"}
# Techniques whose `all` over a set is a weighted average, and so can weight experts by recency.
WEIGHTED_ALL = ("interpolation", "average")


class ProtocolError(UserError, ValueError):
    """A `protocol:` setting of a fit that cannot work or would be ignored; the message names the key
    (`timelit fit` reports it in one line, before any training)."""


def recency_weights(count: int, weighting: Weighting) -> list[float]:
    """Normalised weights of `count` experts, oldest first (FoMo-in-Flux `interpolation_weighting`)."""
    reverse = weighting.startswith("reverse_")
    kind = weighting.removeprefix("reverse_")
    shape = {
        "uniform": lambda i: 1.0,
        "linear": lambda i: float(i),
        "sqrt": math.sqrt,
        "quadratic": lambda i: float(i**2),
        "cubic": lambda i: float(i**3),
        "fifth": lambda i: float(i**5),
        "tenth": lambda i: float(i**10),
        "exp": lambda i: 2.0 ** (i - 1),
        "log": lambda i: math.log(i + 1),
    }[kind]
    raw = [shape(i) for i in range(1, count + 1)]
    if reverse:
        raw.reverse()
    total = sum(raw)
    return [r / total for r in raw]


def check_technique(technique: MergeMethod, hparams: Mapping[str, Any]) -> None:
    """Fail at configuration time on an unknown technique or hyperparameter (the message lists valid ones), and on
    a pair weight set in `hparams`, where `pairwise` would silently let it override the protocol's EMA weight."""
    try:
        validate(technique, dict(hparams))
    except ValueError as error:  # an unknown technique or hyperparameter, or a value out of the technique's range
        key = "protocol.hparams" if technique in TECHNIQUES else "protocol.technique"
        named = repr(technique) in str(error)
        raise ProtocolError(f"{key}{'' if named else f' of {technique!r}'}: {error}") from error
    pair_weight = _PAIR_WEIGHT.get(technique, "weights" if technique == "average" else None)
    if pair_weight in hparams:
        raise ProtocolError(
            f"protocol.hparams.{pair_weight}: the weight of the newer model in the EMA step (and of the expert in "
            f"ft_zs) is protocol.ema_weight; `all` weights experts by protocol.all_weighting"
        )


def pairwise(
    base: WeightsLike,
    older: WeightsLike,
    newer: WeightsLike,
    technique: MergeMethod,
    hparams: Mapping[str, Any],
    weight: float,
) -> dict[str, torch.Tensor]:
    """f([older, newer]) against θ0: the EMA step, and FT-Merge's expert-with-base merge.

    For interpolation/SLERP `weight` is the newer model's share (unless `hparams` set it); `average` gets
    weights [1 - weight, weight]; task-vector techniques combine the two task vectors with their own settings.
    """
    options = dict(hparams)
    if technique in _PAIR_WEIGHT:
        options.setdefault(_PAIR_WEIGHT[technique], weight)
    elif technique == "average":
        options.setdefault("weights", (1.0 - weight, weight))
    return merge(base, [older, newer], technique, **options)


def merge_all(
    base: WeightsLike,
    experts: Sequence[WeightsLike],
    technique: MergeMethod,
    hparams: Mapping[str, Any],
    weighting: Weighting = "uniform",
    include_base: bool = False,
) -> dict[str, torch.Tensor]:
    """The merge of every expert so far (oldest first), optionally with θ0 as the first member.

    Interpolation is pairwise by definition; over a set it means the (recency-)weighted average, as in the pipeline.
    """
    members = [base, *experts] if include_base else list(experts)
    if not members:
        raise ValueError("`all` needs at least one expert")
    if len(members) == 1:
        return _materialise(members[0])
    if technique in WEIGHTED_ALL:
        weights = tuple(recency_weights(len(members), weighting))
        return merge(base, members, "average", weights=weights, **dict(hparams))
    if weighting != "uniform":
        raise ValueError(f"recency weighting '{weighting}' applies to average/interpolation, not to '{technique}'")
    return merge(base, members, technique, **dict(hparams))


MEMBERS_KEY = "timelit.members"
"""A state file's record of the members folded into it: "base" for θ0, else each expert's sha256, oldest first."""


def incremental_all(technique: MergeMethod) -> bool:
    """Whether `all` with `technique` can be carried as running state (`fold_all`) instead of merged again."""
    return TECHNIQUES[technique].incremental


def fold_all(
    base: WeightsLike,
    experts: Sequence[WeightsLike],
    fingerprints: Sequence[str],
    technique: MergeMethod,
    hparams: Mapping[str, Any],
    previous_state: str | os.PathLike[str] | None,
    state: str | os.PathLike[str],
    include_base: bool = False,
) -> dict[str, torch.Tensor]:
    """`merge_all` of an incremental technique (uniform weighting) that reads the newest expert only.

    `previous_state` holds the running state of the members before the newest expert (written by the previous call);
    the state with the newest folded in goes to `state`, atomically. `fingerprints` identify the experts (their
    sha256), oldest first: a previous state whose recorded members are not exactly the members before the newest
    one (missing, another run's, written with other hyperparameters) is not used, and the state is rebuilt from
    every member, which costs what `merge_all` costs. Either way the result is bitwise `merge_all`'s.
    """
    if len(fingerprints) != len(experts):
        raise ValueError(f"{len(fingerprints)} fingerprints for {len(experts)} experts")
    members = [base, *experts] if include_base else list(experts)
    if not members:
        raise ValueError("`all` needs at least one expert")
    prints = (["base"] if include_base else []) + list(fingerprints)
    folded = validate(technique, dict(hparams))
    usable = previous_state is not None and _holds(previous_state, folded.name, hparams_record(folded), prints[:-1])
    new = members[-1:] if usable else members
    merged = update(
        folded, base, new, previous_state if usable else None, state, metadata={MEMBERS_KEY: json.dumps(prints)}
    )
    return _materialise(members[0]) if len(members) == 1 else merged


def _holds(path: str | os.PathLike[str], technique: str, hparams: str, members: Sequence[str]) -> bool:
    """Whether the state file `path` exists and is the running state of exactly `members` under this merge."""
    if not members or not Path(path).exists():
        return False
    folded, metadata = state_members(path)
    return (
        metadata.get(TECHNIQUE_KEY) == technique
        and metadata.get(HPARAMS_KEY) == hparams
        and metadata.get(MEMBERS_KEY) == json.dumps(list(members))
        and folded == len(members)
    )


def _materialise(weights: WeightsLike) -> dict[str, torch.Tensor]:
    if isinstance(weights, (str, os.PathLike)):
        return load_weights(weights)
    return {k: v.clone() for k, v in weights.items()}


# ---------------------------------------------------------------- a protocol's decisions

MERGED_KINDS = ("ema", "all", "ft_zs")
"""The kinds of weights a boundary merges and writes (`ft` is the expert itself, `zs` is θ0)."""


@dataclass(frozen=True)
class ProtocolSettings:
    """One TIME protocol (the `protocol:` section of a fit; TimeMerge's Args say what each setting means), checked
    when it is built: settings that would be ignored, or fail only at the first task boundary, are refused."""

    init: Init = "ema"
    deploy: Deploy = "ema"
    technique: MergeMethod = "interpolation"
    hparams: Mapping[str, Any] = field(default_factory=dict)
    ema_weight: float = 0.5
    ema_start: EmaStart = "base"
    all_weighting: Weighting = "uniform"
    all_include_base: bool = False

    def __post_init__(self) -> None:
        if self.ema_start not in ("base", "first_expert"):
            raise ProtocolError(f"protocol.ema_start must be 'base' or 'first_expert', got '{self.ema_start}'")
        if not 0.0 <= self.ema_weight <= 1.0:
            raise ProtocolError(f"protocol.ema_weight must lie in [0, 1], got {self.ema_weight}")
        check_technique(self.technique, self.hparams)
        uses_all = "all" in (self.init, self.deploy)
        for name, value, default in (
            ("all_weighting", self.all_weighting, "uniform"),
            ("all_include_base", self.all_include_base, False),
        ):
            if value != default and not uses_all:
                raise ProtocolError(
                    f"protocol.{name}={value!r} has no effect: neither init ({self.init}) nor deploy ({self.deploy}) "
                    "is 'all'"
                )
        if self.all_weighting != "uniform" and self.technique not in WEIGHTED_ALL:
            raise ProtocolError(
                f"protocol.all_weighting={self.all_weighting!r} weights an average; technique '{self.technique}' "
                f"merges task vectors (use one of {list(WEIGHTED_ALL)}, or all_weighting: uniform)"
            )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The merged weights every boundary writes: those init and deploy read, in `MERGED_KINDS` order."""
        return tuple(kind for kind in MERGED_KINDS if kind in (self.init, self.deploy))

    @property
    def sequential(self) -> bool:
        """Whether the technique folds one expert per boundary into a running merge (`opcm`): `ema` and `all` are
        then that one merge."""
        return issubclass(TECHNIQUES[self.technique], SequentialTechnique)

    @property
    def folds_all(self) -> bool:
        """Whether `all` is carried as running state (`fold_all`) rather than merged again at every boundary."""
        return "all" in self.kinds and not self.sequential and incremental_all(self.technique)

    def check_keys(self, base: StateDict) -> None:
        """Fail before training, not at the first boundary, on a `skip` pattern that matches none of the model's
        keys (known once the model is built; `base` is θ0)."""
        try:
            merged_keys(MemorySource(base, "model"), validate(self.technique, dict(self.hparams)).skip)
        except IncompatibleWeightsError as error:
            raise ProtocolError(f"protocol.hparams.skip: {error}") from error


class Stored(NamedTuple):
    """Weights a protocol reads: `kind` (`ft`: the expert, `ema`, `all`, `ft_zs`) after `task`, or θ0 (`BASE`)."""

    kind: str
    task: int


BASE = Stored("base", -1)


def init_weights(settings: ProtocolSettings, task: int) -> Stored | None:
    """The weights `task` starts from; None for the first task, which every protocol starts from θ0, the weights
    the model is built with."""
    if task == 0:
        return None
    return BASE if settings.init == "zs" else Stored(settings.init, task - 1)


def deployed_weights(settings: ProtocolSettings, task: int) -> Stored:
    """The weights evaluated after `task` (and, after the last one, shipped as the final model)."""
    return Stored(settings.deploy, task)


@dataclass(frozen=True)
class Pairwise:
    """f([older, θ_t]) against θ0, the newer model weighted `weight` (`pairwise`)."""

    older: Stored
    weight: float


@dataclass(frozen=True)
class Expert:
    """θ_t itself (the EMA's first member under `ema_start: first_expert`)."""


@dataclass(frozen=True)
class MergeAll:
    """The merge of the experts of `members` (tasks, oldest first), with θ0 first if `include_base` (`merge_all`)."""

    members: tuple[int, ...]
    weighting: Weighting
    include_base: bool


@dataclass(frozen=True)
class FoldAll:
    """`MergeAll` as running state (`fold_all`): the state after `previous_state` (None: none) plus θ_t, written as
    the state after `state`."""

    members: tuple[int, ...]
    previous_state: int | None
    state: int
    include_base: bool


@dataclass(frozen=True)
class Step:
    """A sequential technique's running merge `previous` (None before the first expert) with θ_t folded in."""

    previous: Stored | None


Rule = Pairwise | Expert | MergeAll | FoldAll | Step


@dataclass(frozen=True)
class Planned:
    """One merge of a boundary and the kinds of weights it is (a sequential merge is both `ema` and `all`)."""

    kinds: tuple[str, ...]
    rule: Rule


def boundary_plan(settings: ProtocolSettings, task: int, experts: Sequence[int]) -> list[Planned]:
    """What the boundary of `task` merges, in order, given the tasks whose experts are stored (`task`'s included).

    The EMA step reads the previous task's `ema`; `all` merges every stored expert up to `task`, or folds the newest
    into the previous task's running state; `ft_zs` merges θ_t with θ0; a sequential technique folds θ_t into the
    previous task's merged file once, for `ema` and `all` alike.
    """
    kinds, plan = settings.kinds, []
    members = tuple(t for t in experts if t <= task)
    carried = tuple(k for k in kinds if k in ("ema", "all")) if settings.sequential else ()
    if carried:
        plan.append(Planned(carried, Step(None if task == 0 else Stored(carried[0], task - 1))))
    if "ema" in kinds and "ema" not in carried:
        if task > 0:
            rule: Rule = Pairwise(Stored("ema", task - 1), settings.ema_weight)
        else:
            rule = Expert() if settings.ema_start == "first_expert" else Pairwise(BASE, settings.ema_weight)
        plan.append(Planned(("ema",), rule))
    if "all" in kinds and "all" not in carried:
        if settings.folds_all:
            rule = FoldAll(members, task - 1 if task else None, task, settings.all_include_base)
        else:
            rule = MergeAll(members, settings.all_weighting, settings.all_include_base)
        plan.append(Planned(("all",), rule))
    if "ft_zs" in kinds:
        plan.append(Planned(("ft_zs",), Pairwise(BASE, settings.ema_weight)))
    return plan


class WeightFiles(Protocol):
    """Where `realise` finds stored weights (`timelit.merging.merged_files.MergedFiles` provides it)."""

    def path(self, kind: str, task: int) -> Path: ...

    def state(self, task: int) -> Path: ...

    def fingerprints(self, tasks: Sequence[int]) -> list[str]: ...


def realise(
    rule: Rule,
    settings: ProtocolSettings,
    base: StateDict,
    expert: StateDict,
    files: WeightFiles,
    merge_state: MergeState | None = None,
) -> tuple[dict[str, torch.Tensor], MergeState | None]:
    """Compute one planned merge of a boundary: its weights, and a sequential technique's state after it
    (`merge_state` unchanged for the other rules). θ0 and θ_t are in memory, every other member is read from
    `files`."""
    technique, hparams = settings.technique, settings.hparams

    def stored(ref: Stored) -> WeightsLike:
        return base if ref == BASE else str(files.path(ref.kind, ref.task))

    if isinstance(rule, Step):
        previous = None if rule.previous is None else stored(rule.previous)
        return merge_step(base, previous, expert, technique, merge_state, **hparams)
    if isinstance(rule, Expert):
        return dict(expert), merge_state  # the same tensors: written as they are
    if isinstance(rule, Pairwise):
        return pairwise(base, stored(rule.older), expert, technique, hparams, rule.weight), merge_state
    experts = [str(files.path("ft", t)) for t in rule.members]
    if isinstance(rule, FoldAll):
        previous_state = None if rule.previous_state is None else files.state(rule.previous_state)
        folded = fold_all(
            base,
            experts,
            files.fingerprints(rule.members),
            technique,
            hparams,
            previous_state,
            files.state(rule.state),
            rule.include_base,
        )
        return folded, merge_state
    return merge_all(base, experts, technique, hparams, rule.weighting, rule.include_base), merge_state
