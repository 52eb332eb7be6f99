"""The whole-matrix kernel of the SVD methods: which tensors are matrices, what is read whole, and in what precision."""

from __future__ import annotations

import pytest
import torch

from timelit.merging import merge, whole
from timelit.merging.spectral import is_matrix

SVD_METHODS = ["tsv", "iso_c", "iso_cts"]


def test_linear_maps_are_matrices_and_embeddings_vectors_and_convolutions_are_not(clip_base):
    matrices = {key for key, value in clip_base.items() if is_matrix(key, value.shape)}
    suffixes = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    expected = {key for key in clip_base if key.endswith(suffixes)} | {"visual.proj", "text_projection"}
    assert matrices == expected
    for key in ("token_embedding.weight", "positional_embedding", "visual.positional_embedding"):
        assert clip_base[key].dim() == 2 and key not in matrices  # lookup tables, not linear maps
    assert not is_matrix("w", (1, 16)) and not is_matrix("w", (16,)) and not is_matrix("w", (16, 3, 4, 4))


@pytest.mark.parametrize("method", SVD_METHODS)
def test_only_matrices_are_read_whole_and_the_rest_is_streamed_in_chunks(clip_base, perturbed, monkeypatch, method):
    """Memory is bounded by the largest matrix times the number of experts: embeddings (ViT-B/16's 25M-entry token
    table) and every other tensor keep the chunked path."""
    read: list[str] = []
    original = whole.read_whole

    def recording(source, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        read.append(key)
        return original(source, key, out)

    monkeypatch.setattr(whole, "read_whole", recording)
    experts = perturbed(clip_base, 3)
    chunked = merge(clip_base, experts, method, chunk_size=100)
    assert set(read) == {key for key, value in clip_base.items() if is_matrix(key, value.shape)}
    everything = merge(clip_base, experts, method, chunk_size=1 << 22)
    assert all(torch.equal(chunked[key], everything[key]) for key in clip_base)


@pytest.mark.parametrize("method", [*SVD_METHODS, "opcm"])
def test_low_precision_weights_are_decomposed_in_float32(clip_base, perturbed, method):
    low = lambda sd: {key: value.to(torch.bfloat16) for key, value in sd.items()}  # noqa: E731
    base, experts = low(clip_base), [low(expert) for expert in perturbed(clip_base, 3, scale=0.05)]
    up = lambda sd: {key: value.float() for key, value in sd.items()}  # noqa: E731
    upcast = merge(up(base), [up(expert) for expert in experts], method)
    out = merge(base, experts, method)
    assert all(out[key].dtype == torch.bfloat16 for key in out)
    if method != "opcm":  # OPCM folds through merged weights held in the base's dtype, rounded at every step
        assert all(torch.equal(out[key], upcast[key].to(torch.bfloat16)) for key in clip_base)
