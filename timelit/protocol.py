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

"Best-in-TIME" is init=ema, deploy=ema. The pipeline's named protocols map to: finetune = ft/ft, ZS-Merge
(`zs_paint`) = zs/ema, EMA-Merge (`ema_paint`) = ema/ema, FT-Merge (`ft_paint`) = ft_zs/ft_zs, offline merge =
zs/all, and `double_merge_<init>_<deploy>` = init/deploy with `ema_start="first_expert"` and the base excluded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from timelit.merging import MergeMethod, merge, validate

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


def _materialise(weights: WeightsLike) -> dict[str, torch.Tensor]:
    if isinstance(weights, str):
        from timelit.merging import load_weights

        return load_weights(weights)
    return {k: v.clone() for k, v in weights.items()}
