"""Merging weight files: a base and experts on disk (safetensors, Lightning checkpoints, ExpertStore folders) into
one merged file that records its provenance. `timelit merge` (timelit/commands/merge.py) is its command line.

    merge_files(Path("base.safetensors"), [Path("runs/x/experts")], validate("ties", {"k": 0.3}), Path("m.safetensors"))

(The module keeps the name it had when it held the command too; issue 19 item 4 renames it once merging/ is free.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning
import torch

from timelit.merging import merge
from timelit.merging.engine import DEFAULT_CHUNK_SIZE, DEFAULT_THREADS
from timelit.merging.safetensors_io import atomic_file, file_sha256, save_weights
from timelit.merging.sources import NamedWeights
from timelit.merging.store import ExpertStore
from timelit.merging.technique import Technique
from timelit.utilities.errors import UserError, reading_checkpoint

MODEL_PREFIX = "model."
"""The timelit LightningModule holds the open_clip model as ``self.model``, so checkpoint keys are ``model.<key>``."""
OUTPUT_SUFFIXES = (".safetensors", ".ckpt")


class MergeInputError(UserError, ValueError):
    """What a merge was given and cannot use (a file or folder that holds no weights of the kind expected, an output
    of another kind, hyperparameters the technique does not take); the message names it."""


def merge_files(
    base: Path,
    experts: list[Path],
    technique: Technique,
    out: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = DEFAULT_THREADS,
    progress: bool = True,
) -> Path:
    """Merge the experts (files or ExpertStore folders, oldest first) onto `base` with `technique` and write `out`
    (.safetensors, or a weights-only .ckpt); its metadata records the method, its hyperparameters and the sha256 of
    the base and of every expert. Returns `out`."""
    if out.suffix not in OUTPUT_SUFFIXES:
        raise MergeInputError(f"--out must end in .safetensors or .ckpt, got {out}")
    if out.is_dir():
        raise MergeInputError(f"--out {out} is a folder; give the path of the file to write")
    base_weights, base_hash = _load(base)
    expert_weights, expert_hashes = _experts(experts)
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


def _load(path: Path) -> tuple[Path | dict[str, torch.Tensor], str]:
    """A safetensors path (streamed later) or a checkpoint's open_clip state dict, with the file's sha256."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        return path, file_sha256(path)
    if path.suffix == ".ckpt":
        return NamedWeights(load_checkpoint_weights(path), str(path)), file_sha256(path)
    raise MergeInputError(f"{path}: expected a .safetensors or .ckpt file")


def _experts(paths: list[Path]) -> tuple[list[Path | dict[str, torch.Tensor]], list[dict[str, str]]]:
    weights: list[Path | dict[str, torch.Tensor]] = []
    hashes: list[dict[str, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            store = ExpertStore(path)
            if not len(store):
                raise MergeInputError(f"{path}: no expert_NNNN.safetensors files in this folder")
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
    with reading_checkpoint(path):  # not a torch checkpoint, or cut short: one line naming it
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise MergeInputError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    weights = {key[len(MODEL_PREFIX) :]: value for key, value in state.items() if key.startswith(MODEL_PREFIX)}
    if not weights:
        raise MergeInputError(f"{path}: the checkpoint's state_dict has no '{MODEL_PREFIX}*' keys")
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise MergeInputError(
                f"{path}: state_dict['{MODEL_PREFIX}{key}'] is a {type(value).__name__}, not a tensor"
            )
    return weights
