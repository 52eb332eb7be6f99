"""TIME protocols as pure rules: which weights start a task, which are deployed after it.

    python -m pytest tests/unit/test_protocol.py tests/integration/test_time_merge.py -q

TIME (arXiv 2412.06712, §3) separates *initialization* of the next expert from *deployment* after a task:

    init    zs      the zero-shot base weights θ0
            ft      the last expert θ_{t-1}
            ema     the task-level EMA m_{t-1}, m_t = f([m_{t-1}, θ_t]) from m_0 = θ0
            all     a merge of the base with every expert so far
            ft_zs   the last expert merged with the base, f([θ0, θ_{t-1}]) (the pipeline's FT-Merge, `ft_paint`)
    deploy  ft, ema, all, ft_zs   the same quantities after the task (with θ_t included)

f is the protocol's merge technique. With `interpolation` (the default, and the pipeline's) the EMA weight of the new
expert is `ema_weight` (fixed 0.5: the EMA forgets geometrically, not as 1/t), and `all` is a weighted average
(uniform, or by recency as the pipeline's offline merge). Other techniques (task arithmetic, TIES, ...) merge the
pair or the set of task vectors against θ0, as the pipeline's `ema_paint` / `offline_merge` do with them.

`all` is O(1) in t where the technique is incremental (`Technique.incremental`: task arithmetic, LiNeS, TIES, DARE,
DARE-TIES, Breadcrumbs, Breadcrumbs-TIES, MagMax, SLERP's fold): `fold_all` keeps the merge's running state in a
file beside the experts and folds in the newest expert only, with the bits of `merge_all`. Every other technique
merges all experts again at each boundary (docs/ARCHITECTURE.md, "The task boundary in O(1)", says why each is not
incremental).

"Best-in-TIME" is init=ema, deploy=ema. The pipeline's named protocols map to: finetune = ft/ft, ZS-Merge
(`zs_paint`) = zs/ema, EMA-Merge (`ema_paint`) = ema/ema, FT-Merge (`ft_paint`) = ft_zs/ft_zs, offline merge =
zs/all, and `double_merge_<init>_<deploy>` = init/deploy with `ema_start="first_expert"` and the base excluded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from timelit.merging import TECHNIQUES, MergeMethod, merge, validate
from timelit.merging.engine import state_members, update
from timelit.merging.running import HPARAMS_KEY, TECHNIQUE_KEY, hparams_record

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
    validate(technique, dict(hparams))
    pair_weight = _PAIR_WEIGHT.get(technique, "weights" if technique == "average" else None)
    if pair_weight in hparams:
        raise ValueError(
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
        from timelit.merging import load_weights

        return load_weights(weights)
    return {k: v.clone() for k, v in weights.items()}
