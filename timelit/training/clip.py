"""Building open_clip models by name, with a pretrained tag, a local checkpoint, or random initialisation.

    python -c "from timelit.training.clip import build_clip; print(build_clip('timelit-tiny-ViT').model)"

open_clip's factory turns a model name into an architecture, transforms and a tokenizer. timelit adds its tiny
configs (`timelit/training/model_configs/*.json`) to that registry, so the quickstart and the tests build their models
through the same factory as ViT-B-16 and need no download.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torch import nn

from timelit.utilities.errors import UnreadableFileError, UserError, reading_checkpoint
from timelit.utilities.resources import MODEL_CONFIGS_DIR

log = logging.getLogger(__name__)

_registered = False


def register_model_configs() -> None:
    """Add timelit's tiny model configs to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIGS_DIR)
        _registered = True


class ModelNameError(UserError, ValueError):
    """A `model_name` that is no open_clip architecture; the message lists the nearest."""


class PretrainedMismatchError(UserError, ValueError):
    """A `pretrained` weights file whose keys do not fit `model_name` (weights of another model)."""


@dataclass
class CLIPBundle:
    """An open_clip model with the preprocessing that belongs to it."""

    model: nn.Module
    train_transform: Any
    eval_transform: Any
    tokenizer: Any
    preprocess_cfg: dict[str, Any]


def _check_model_name(model_name: str) -> None:
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if model_name.replace("/", "-") not in known:
        close = difflib.get_close_matches(model_name, known, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelNameError(
            f"model_name '{model_name}' is not an open_clip architecture.{hint} "
            f"Known names: `python -c 'import open_clip; print(open_clip.list_models())'`; timelit adds "
            f"{sorted(p.stem for p in MODEL_CONFIGS_DIR.glob('*.json'))}."
        )


def build_clip(model_name: str, device: str | torch.device = "cpu") -> CLIPBundle:
    """Build the architecture (random weights) with its train/eval transforms and tokenizer.

    Pretrained weights are loaded separately (`load_pretrained`) so that a LightningModule can build the model in
    `__init__` cheaply and load weights in `setup`, after `prepare_data` has had the chance to create them.
    """
    register_model_configs()
    _check_model_name(model_name)
    # open_clip warns on the root logger that the model is "initialized randomly": weights come later, by design.
    root = logging.getLogger()
    level, root.level = root.level, max(root.level, logging.ERROR)
    try:
        model = open_clip.create_model(model_name, pretrained=None, device=device)
    finally:
        root.setLevel(level)
    cfg = merge_preprocess_dict(
        PreprocessCfg(size=model.visual.image_size), getattr(model.visual, "preprocess_cfg", {})
    )
    preprocess = PreprocessCfg(**cfg)
    return CLIPBundle(
        model=model,
        train_transform=image_transform_v2(preprocess, is_train=True),
        eval_transform=image_transform_v2(preprocess, is_train=False),
        tokenizer=open_clip.get_tokenizer(model_name),
        preprocess_cfg=cfg,
    )


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read open_clip weights from safetensors, a torch file or a Lightning checkpoint, never through pickle.

    A timelit Lightning checkpoint holds the open_clip model under `model.`; that prefix (and DataParallel's
    `module.`) is removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(path))
        except SafetensorError as error:
            raise UnreadableFileError(f"{path}: not a safetensors file, or a truncated one ({error})") from error
    else:
        with reading_checkpoint(path):  # not a torch file, cut short, or other objects than weights: one line
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state_dict, dict):
        raise UnreadableFileError(f"'{path}' does not hold a state dict (found {type(state_dict).__name__})")
    return _strip_prefix(_strip_prefix(state_dict, "module."), "model.")


def load_pretrained(model: nn.Module, model_name: str, pretrained: str) -> None:
    """Load `pretrained` (an open_clip tag such as `laion2b_s34b_b88k`, or a file) into `model` in place.

    Tags go through open_clip's own download and cache (set HF_HUB_OFFLINE=1 on clusters whose nodes cannot reach
    the hub, after fetching once on a login node). Files are loaded strictly: a mismatch names the missing and
    unexpected keys.
    """
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    path = Path(pretrained).expanduser()
    if tag_cfg:
        checkpoint = open_clip.download_pretrained(tag_cfg)
        open_clip.load_checkpoint(model, checkpoint, strict=True, weights_only=True)
        return
    if not path.is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise FileNotFoundError(
            f"pretrained='{pretrained}' is neither an open_clip tag of '{model_name}' (tags: {tags or 'none'}) nor an "
            f"existing file"
        )
    state_dict = read_state_dict(path)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise PretrainedMismatchError(
            f"weights in '{path}' do not fit model '{model_name}': {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
