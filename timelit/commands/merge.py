"""`timelit merge`: merge fine-tuned experts onto a base model from the command line.

    timelit merge --base base.safetensors --experts runs/x/experts --method ties \\
        --hparams '{"k": 0.3, "scope": "tower"}' --out merged.safetensors
    timelit merge --base base.safetensors --experts runs/x/experts/expert_*.safetensors --method model_stock \\
        --out merged.safetensors
    timelit merge --base last.ckpt --experts '[a.safetensors, b.safetensors]' --method interpolation --out ema.ckpt

The files are read and written by timelit/merging/weight_files.py (`merge_files`), the techniques are timelit/merging's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from timelit.merging import MergeMethod, validate
from timelit.merging.engine import DEFAULT_CHUNK_SIZE, DEFAULT_THREADS
from timelit.merging.weight_files import MergeInputError, merge_files


def merge_command(
    base: Path,
    experts: Path | list[Path],
    method: MergeMethod,
    out: Path,
    hparams: dict[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = DEFAULT_THREADS,
    progress: bool = True,
) -> Path:
    """Merge fine-tuned experts onto a base model (TIME, arXiv 2412.06712) and save the merged weights.

    Safetensors inputs are streamed tensor by tensor in slices, so memory stays near one model plus a few slices
    however many experts there are. The output's metadata records the method, its hyperparameters and the sha256 of
    the base and of every expert.

    Args:
        base: the base weights theta_0 (the zero-shot model): a .safetensors file of open_clip keys, or a Lightning
            .ckpt of the timelit module (keys ``model.<open_clip key>``; read with ``weights_only=True``).
        experts: the experts, oldest first: .safetensors or .ckpt files, or ExpertStore directories (all their
            ``expert_NNNN.safetensors`` files, in task order), as one path (``runs/x/experts``), several paths
            (``a.safetensors b.safetensors``, or a shell glob such as ``runs/x/experts/expert_*.safetensors``,
            which expands in name order, i.e. task order) or a list (``'[a.safetensors, b.safetensors]'``).
        method: the merge technique; its module in timelit/merging states the formula, the paper and the defaults.
        out: where to write the result: ``.safetensors`` (open_clip keys), or ``.ckpt`` (a weights-only Lightning
            checkpoint ``{"state_dict": {"model." + key: tensor}, "pytorch-lightning_version": ...}`` whose
            state_dict loads into the timelit module; it holds no optimizer or loop state to resume from).
        hparams: the method's hyperparameters as a JSON object, e.g. ``'{"k": 0.3, "scope": "tower"}'`` for ties;
            names as in the papers (k, lam, p, seed, w, t, weights, top_drop or beta, bottom_drop or gamma, alpha,
            beta, mask_lambda, min_agree, common_space_fraction, scope, skip, lines, lines_alpha, lines_beta). An
            unknown name is an error that lists the valid ones. The output records the values used, defaults
            resolved (e.g. lam 1.0). A sequential method (opcm) folds the experts in the order given.
        chunk_size: elements of one tensor read per expert at a time.
        threads: torch threads for the merge (default 1: robust when the machine is busy; null keeps torch's).
        progress: show a progress bar over tensors.

    Returns:
        The path written.
    """
    try:
        technique = validate(method, hparams or {})  # fail before reading any weights
    except ValueError as error:  # a hyperparameter the technique does not take, or a value out of its range
        raise MergeInputError(f"--hparams: {error}") from error
    for name, value in (("chunk_size", chunk_size), ("threads", threads)):
        if value is not None and value < 1:
            raise MergeInputError(f"--{name} must be a positive integer, got {value}")
    paths = [experts] if isinstance(experts, (str, os.PathLike)) else experts
    return merge_files(Path(base), [Path(p) for p in paths], technique, Path(out), chunk_size, threads, progress)


def merge_argv(args: list[str]) -> list[str]:
    """``--experts a b c`` -> ``--experts=["a", "b", "c"]``: the paths a shell glob expands to, as one JSON list.

    jsonargparse reads a list argument from one token (``--experts '[a, b]'``), so the arguments that follow
    ``--experts`` up to the next option are gathered here. One path (a file, a store directory, or a list already
    written as one token) is passed on unchanged.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        out.append(args[i])
        i += 1
        if out[-1] != "--experts":
            continue
        values = []
        while i < len(args) and not args[i].startswith("-"):
            values.append(args[i])
            i += 1
        if len(values) > 1:
            out[-1] = f"--experts={json.dumps(values)}"
        else:
            out += values
    return out
