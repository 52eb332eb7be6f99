"""Model merging for TIME (arXiv 2412.06712): pure functions over state dicts, streamed from safetensors files.

    from timelit.merging import ExpertStore, merge
    ema = merge(base, [ema_prev, expert], "interpolation", w=0.5)      # the task-level EMA
    deployed = merge("base.safetensors", ExpertStore("experts"), "ties", k=0.3, scope="tower")   # "all"

    merged, state = merge_step(base, ema_prev, expert, "opcm", state)  # a sequential technique, one expert

Formulas, conventions and defaults: shared/MERGING.md. Each technique is one module holding one frozen dataclass
whose fields are its hyperparameters and whose kernel is element-wise over a chunk, whole-matrix (the SVD methods,
``spectral``) or sequential (OPCM); ``engine`` runs any of them over state dicts or files in bounded memory.
``TECHNIQUES`` is the only registry.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from timelit.merging.average import Average
from timelit.merging.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from timelit.merging.consensus_ties import ConsensusTies
from timelit.merging.dare import Dare, DareTies
from timelit.merging.engine import DEFAULT_CHUNK_SIZE, DEFAULT_THREADS, run, step
from timelit.merging.interpolation import Interpolation
from timelit.merging.iso import IsoC, IsoCts
from timelit.merging.lines import Lines
from timelit.merging.magmax import MagMax
from timelit.merging.model_stock import ModelStock
from timelit.merging.opcm import Opcm
from timelit.merging.random_merge import RandomMerge
from timelit.merging.safetensors_io import load_weights, read_metadata, save_weights
from timelit.merging.slerp import Slerp
from timelit.merging.sources import WeightsLike
from timelit.merging.store import ExpertStore
from timelit.merging.tall_masks import TallMasks
from timelit.merging.task_arithmetic import TaskArithmetic
from timelit.merging.technique import MergeState, Scope, SequentialTechnique, Technique
from timelit.merging.ties import Ties
from timelit.merging.tsv import Tsv

__all__ = [
    "TECHNIQUES",
    "ExpertStore",
    "MergeMethod",
    "MergeState",
    "Scope",
    "SequentialTechnique",
    "Technique",
    "load_weights",
    "merge",
    "merge_step",
    "read_metadata",
    "save_weights",
    "validate",
]

MergeMethod = Literal[
    "average",
    "interpolation",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "magmax",
    "lines",
    "model_stock",
    "tall_masks",
    "consensus_ties",
    "random",
    "tsv",
    "iso_c",
    "iso_cts",
    "opcm",
]
"""The merge methods, for typed configs (``method: MergeMethod``); the keys of ``TECHNIQUES``."""

TECHNIQUES: dict[str, type[Technique]] = {
    technique.name: technique
    for technique in (
        Average,
        Interpolation,
        Slerp,
        TaskArithmetic,
        Ties,
        Dare,
        DareTies,
        Breadcrumbs,
        BreadcrumbsTies,
        MagMax,
        Lines,
        ModelStock,
        TallMasks,
        ConsensusTies,
        RandomMerge,
        Tsv,
        IsoC,
        IsoCts,
        Opcm,
    )
}


def validate(method: str, hparams: Mapping[str, Any] | None = None) -> Technique:
    """Check a method name and its hyperparameters without merging; return the configured technique.

    Raises a ValueError that lists the valid names and suggests the nearest one (``"tie"`` -> ``"ties"``), or that
    translates a name from the pipeline or mergekit (``prune_percentile`` -> ``k = 1 - prune_percentile``). A
    technique's ``aliases`` (Breadcrumbs' ``beta``/``gamma``, MERGING.md's names) are accepted for their fields; an
    alias given together with its field is an error. Checks that need the experts (how many, the length of
    ``weights``) happen when merging.
    """
    if method not in TECHNIQUES:
        raise ValueError(
            f"unknown merge method {method!r}{_nearest(method, TECHNIQUES)}; valid: {', '.join(TECHNIQUES)}"
        )
    technique = TECHNIQUES[method]
    fields = [field.name for field in dataclasses.fields(technique)]
    valid = [*fields, *technique.aliases]
    listed = ", ".join([*fields, *(f"{alias} (= {field})" for alias, field in technique.aliases.items())])
    kwargs: dict[str, Any] = {}
    given: dict[str, str] = {}  # field -> the name it was given under
    for name, value in (hparams or {}).items():
        if name not in valid:
            hint = f" ({technique.hints[name]})" if name in technique.hints else _nearest(name, valid)
            raise ValueError(f"unknown hyperparameter {name!r} for {method!r}{hint}; valid: {listed}")
        field = technique.aliases.get(name, name)
        if field in given:
            raise ValueError(
                f"{given[field]!r} and {name!r} are two names for the same {method!r} hyperparameter {field!r}; "
                "give one"
            )
        given[field], kwargs[field] = name, value
    return technique(**kwargs)


def _nearest(name: str, valid: Sequence[str] | Mapping[str, Any]) -> str:
    near = difflib.get_close_matches(name, list(valid), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def merge(
    base: WeightsLike,
    experts: Sequence[WeightsLike] | ExpertStore,
    method: MergeMethod | Technique,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = DEFAULT_THREADS,
    progress: bool = False,
    **hparams: Any,
) -> dict[str, torch.Tensor]:
    """Merge ``experts`` (oldest first) onto the base weights theta_0 with ``method`` and its hyperparameters.

    Args:
        base: theta_0 as a state dict or a safetensors path; task vectors are taken against it, and its keys, shapes
            and dtypes are the output's. Non-floating and ``skip``-ped tensors are copied from it.
        experts: state dicts, safetensors paths, or an :class:`ExpertStore`. Files are streamed chunk by chunk;
            state dicts are read in place (tensors on another device are first copied to the CPU).
        method: a name from ``TECHNIQUES`` (see :data:`MergeMethod`), or a technique from :func:`validate`.
        chunk_size: elements per slice of a tensor held per expert at a time; results do not depend on it except
            for whole-tensor float64 statistics (the angles of SLERP and model stock, LiNeS' auto alpha), which are
            summed chunk by chunk.
        threads: torch intra-op threads during the merge (default 1, robust on busy machines, see
            ``engine.DEFAULT_THREADS``); ``None`` keeps torch's current setting.
        progress: show a tqdm bar over tensors.
        **hparams: the method's hyperparameters, e.g. ``k=0.3, scope="tower"`` for TIES.

    Returns:
        A new state dict; the inputs are not modified.
    """
    if isinstance(method, Technique):
        if hparams:
            raise ValueError("pass hyperparameters either in the technique or as keywords, not both")
        technique = method
    else:
        technique = validate(method, hparams)
    paths = experts.paths if isinstance(experts, ExpertStore) else experts
    return run(technique, base, paths, chunk_size=chunk_size, threads=threads, progress=progress)


def merge_step(
    base: WeightsLike,
    previous: WeightsLike | None,
    expert: WeightsLike,
    method: MergeMethod | SequentialTechnique,
    state: MergeState | None = None,
    *,
    threads: int | None = DEFAULT_THREADS,
    **hparams: Any,
) -> tuple[dict[str, torch.Tensor], MergeState | None]:
    """Fold one more expert into the running merge of a sequential technique (``opcm``).

    ``merge(base, experts, method)`` equals these steps taken over ``experts`` in order from ``previous=None,
    state=None``, each fed the previous step's weights and state, bit for bit; a TIME protocol carries the state in
    its checkpoint and the weights in its merged file, so a resumed run merges exactly as an uninterrupted one.

    Args:
        base: theta_0, a state dict or safetensors path.
        previous: the merge so far (a state dict or path), or ``None`` before the first expert.
        expert: the newest expert.
        method: a sequential technique's name or instance.
        state: what the previous step returned (plain numbers), ``None`` before the first expert.
        threads: torch intra-op threads during the step, as for :func:`merge`.
        **hparams: the technique's hyperparameters (``alpha`` for OPCM).

    Returns:
        The merged state dict and the state to pass to the next step.
    """
    technique = method if isinstance(method, Technique) else validate(method, hparams)
    if isinstance(method, Technique) and hparams:
        raise ValueError("pass hyperparameters either in the technique or as keywords, not both")
    if not isinstance(technique, SequentialTechnique):
        sequential = [name for name, kind in TECHNIQUES.items() if issubclass(kind, SequentialTechnique)]
        raise ValueError(
            f"{technique.name} merges all experts at once; merge_step needs a sequential technique "
            f"({', '.join(sequential)}); use merge() for the others"
        )
    return step(technique, base, previous, expert, state, threads=threads)
