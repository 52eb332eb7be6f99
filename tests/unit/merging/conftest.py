"""Fixtures for the merge engine: a tiny two-tower open_clip state dict and experts written as safetensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import open_clip
import pytest
import torch

from timelit.merging import save_weights

StateDict = dict[str, torch.Tensor]


def _tiny_clip(architecture: type) -> StateDict:
    """The weights of a tiny open_clip model whose towers differ in depth (3 visual blocks, 2 text blocks)."""
    torch.manual_seed(0)
    model = architecture(
        embed_dim=8,
        vision_cfg={"layers": 3, "width": 16, "patch_size": 4, "image_size": 8, "head_width": 8},
        text_cfg={"layers": 2, "width": 16, "heads": 2, "context_length": 5, "vocab_size": 20},
    )
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="session")
def clip_base() -> StateDict:
    """An open_clip CLIP, built by open_clip itself."""
    return _tiny_clip(open_clip.CLIP)


@pytest.fixture(scope="session")
def custom_text_clip_base() -> StateDict:
    """The same model as open_clip's CustomTextCLIP, whose text tower keys start with ``text.``."""
    return _tiny_clip(open_clip.CustomTextCLIP)


def _perturbed(base: StateDict, n: int, scale: float = 0.01, seed: int = 1) -> list[StateDict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            key: (value + scale * torch.randn(value.shape, generator=generator)).to(value.dtype)
            if value.is_floating_point()
            else value.clone()
            for key, value in base.items()
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def perturbed() -> Callable[..., list[StateDict]]:
    """``perturbed(base, n, scale=0.01, seed=1)``: n experts theta_0 + scale * noise, each with its own noise."""
    return _perturbed


def _towers(state_dict: StateDict) -> list[StateDict]:
    visual = {key: value for key, value in state_dict.items() if key.startswith("visual.")}
    return [visual, {key: value for key, value in state_dict.items() if key not in visual}]


@pytest.fixture(scope="session")
def towers() -> Callable[[StateDict], list[StateDict]]:
    """``towers(state_dict)``: [visual tower, text tower], split as ``scope="tower"`` splits them."""
    return _towers


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, StateDict], Path]:
    """Write a state dict to ``tmp_path/<name>.safetensors`` and return the path."""

    def write(name: str, state_dict: StateDict) -> Path:
        path = tmp_path / f"{name}.safetensors"
        save_weights(path, state_dict)
        return path

    return write


def _close(a: StateDict, b: StateDict, atol: float = 2e-6) -> None:
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="session")
def close() -> Callable[..., None]:
    """Every tensor of `b` equals `a`'s to `atol` (absolute only): the formula tests of the SVD methods and OPCM."""
    return _close
