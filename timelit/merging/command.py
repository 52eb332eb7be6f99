"""``timelit merge``: merge fine-tuned experts onto a base model from the command line.

    timelit merge --base base.safetensors --experts runs/x/experts --method ties \\
        --hparams '{"k": 0.3, "scope": "tower"}' --out merged.safetensors
    timelit merge --base base.safetensors --experts runs/x/experts/expert_*.safetensors --method model_stock \\
        --out merged.safetensors
    timelit merge --base last.ckpt --experts '[a.safetensors, b.safetensors]' --method interpolation --out ema.ckpt

Wire it with ``jsonargparse.CLI({"merge": merge_command, ...}, as_positional=False)`` so that every parameter is a
``--flag``, after :func:`merge_argv` has gathered the paths that follow ``--experts``; the docstring below becomes
``--help``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning
import torch

from timelit.merging import MergeMethod, merge, validate
from timelit.merging.engine import DEFAULT_CHUNK_SIZE, DEFAULT_THREADS
from timelit.merging.safetensors_io import atomic_file, file_sha256, save_weights
from timelit.merging.store import ExpertStore

MODEL_PREFIX = "model."
"""The timelit LightningModule holds the open_clip model as ``self.model``, so checkpoint keys are ``model.<key>``."""


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
    technique = validate(method, hparams or {})  # fail before reading any weights
    out = Path(out)
    if out.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"--out must end in .safetensors or .ckpt, got {out}")
    base_weights, base_hash = _load(Path(base))
    expert_weights, expert_hashes = _experts([experts] if isinstance(experts, (str, os.PathLike)) else experts)
    merged = merge(base_weights, expert_weights, technique, chunk_size=chunk_size, threads=threads, progress=progress)
    metadata = {
        "timelit.method": technique.name,
        "timelit.hparams": json.dumps(technique.hparams(len(expert_weights))),
        "timelit.base": json.dumps({"file": str(base), "sha256": base_hash}),
        "timelit.experts": json.dumps(expert_hashes),
    }
    if out.suffix == ".safetensors":
        save_weights(out, merged, metadata)
    else:
        checkpoint = {
            "state_dict": {MODEL_PREFIX + key: tensor for key, tensor in merged.items()},
            "pytorch-lightning_version": lightning.__version__,
            "timelit_merge": metadata,
        }
        with atomic_file(out) as file:
            torch.save(checkpoint, file)
    return out


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


def _load(path: Path) -> tuple[Path | dict[str, torch.Tensor], str]:
    """A safetensors path (streamed later) or a checkpoint's open_clip state dict, with the file's sha256."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        return path, file_sha256(path)
    if path.suffix == ".ckpt":
        return load_checkpoint_weights(path), file_sha256(path)
    raise ValueError(f"{path}: expected a .safetensors or .ckpt file")


def _experts(paths: list[Path]) -> tuple[list[Path | dict[str, torch.Tensor]], list[dict[str, str]]]:
    weights: list[Path | dict[str, torch.Tensor]] = []
    hashes: list[dict[str, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            store = ExpertStore(path)
            if not len(store):
                raise ValueError(f"{path}: no expert_NNNN.safetensors files in this directory")
            weights += store.paths
            hashes += [{"file": str(path / item["file"]), "sha256": item["sha256"]} for item in store.index()]
        else:
            loaded, digest = _load(path)
            weights.append(loaded)
            hashes.append({"file": str(path), "sha256": digest})
    return weights, hashes


def load_checkpoint_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The open_clip state dict inside a timelit Lightning checkpoint (``model.`` prefix stripped).

    ``weights_only=True`` keeps pickle from running code in an untrusted file.
    """
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    weights = {key[len(MODEL_PREFIX) :]: value for key, value in state.items() if key.startswith(MODEL_PREFIX)}
    if not weights:
        raise ValueError(f"{path}: the checkpoint's state_dict has no '{MODEL_PREFIX}*' keys")
    return weights
