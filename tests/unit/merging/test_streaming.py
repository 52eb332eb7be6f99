"""Merging from safetensors files: the same bits as in memory, validated headers, dtypes, copies, closed files."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from timelit.merging import TECHNIQUES, ExpertStore, SequentialTechnique, merge
from timelit.merging.chunks import Workspace
from timelit.merging.safetensors_io import SafetensorsReader

SMALL_CHUNK = 100  # cuts most tensors of the tiny CLIP (up to 1,024 entries) into several unaligned slices

HPARAMS = {
    "ties": {"k": 0.3, "scope": "tower"},
    "dare": {"p": 0.5},
    "dare_ties": {"p": 0.5},
    "lines": {"alpha": "auto"},
    "consensus_ties": {"k": 0.3, "scope": "tower"},
    "tall_masks": {"min_agree": 2, "lines": True},
    "random": {"seed": 3},
    "tsv": {"lines": True},
    "iso_c": {"lines": True, "lines_alpha": "auto"},
    "iso_cts": {"common_space_fraction": 0.5},
    "opcm": {"alpha": 0.3},
}


def _equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", list(TECHNIQUES))
def test_files_and_state_dicts_merge_to_the_same_bits(clip_base, perturbed, write, method):
    experts = perturbed(clip_base, 2 if method == "interpolation" else 3)
    paths = [write(f"expert{i}", expert) for i, expert in enumerate(experts)]
    hparams = HPARAMS.get(method, {})
    in_memory = merge(clip_base, experts, method, chunk_size=SMALL_CHUNK, **hparams)
    streamed = merge(write("base", clip_base), paths, method, chunk_size=SMALL_CHUNK, **hparams)
    assert _equal(streamed, in_memory)


@pytest.mark.parametrize("method", [m for m in TECHNIQUES if m not in ("slerp", "lines", "model_stock")])
def test_element_wise_techniques_do_not_depend_on_the_chunk_size(clip_base, perturbed, method):
    experts = perturbed(clip_base, 2 if method == "interpolation" else 3)
    hparams = HPARAMS.get(method, {})
    assert _equal(
        merge(clip_base, experts, method, chunk_size=SMALL_CHUNK, **hparams),
        merge(clip_base, experts, method, **hparams),
    )


@pytest.mark.parametrize("method", [m for m in TECHNIQUES if not issubclass(TECHNIQUES[m], SequentialTechnique)])
def test_every_kernel_buffer_is_one_chunk_long(clip_base, perturbed, monkeypatch, method):
    """Every workspace buffer, the weighted average's float64 ones included, is at most one chunk long: the kernels'
    scratch memory does not grow with the tensor, the model or the number of experts. (The SVD methods read whole
    matrices outside the workspace, test_spectral.py; OPCM, sequential, reads whole tensors only.)"""
    sizes: list[int] = []
    get = Workspace.get

    def recording(self: Workspace, name: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        sizes.append(n)
        return get(self, name, n, dtype)

    monkeypatch.setattr(Workspace, "get", recording)
    experts = perturbed(clip_base, 2 if method == "interpolation" else 3)
    merge(clip_base, experts, method, chunk_size=SMALL_CHUNK, **HPARAMS.get(method, {}))
    assert sizes and max(sizes) <= SMALL_CHUNK


def test_a_store_is_merged_in_task_order(clip_base, perturbed, tmp_path):
    experts = perturbed(clip_base, 3)
    store = ExpertStore(tmp_path / "experts")
    for task in (2, 0, 1):
        store.add(task, experts[task])
    assert _equal(merge(clip_base, store, "magmax"), merge(clip_base, experts, "magmax"))


def test_a_missing_key_is_reported_with_file_and_key(clip_base, perturbed, write):
    (expert,) = perturbed(clip_base, 1)
    del expert["visual.proj"]
    path = write("broken", expert)
    with pytest.raises(ValueError, match=rf"{path}: keys differ .* missing \['visual.proj'\]"):
        merge(clip_base, [path], "average")


def test_a_shape_mismatch_is_reported_before_any_data_is_read(clip_base, perturbed, write, monkeypatch):
    good, bad = perturbed(clip_base, 2)
    bad["token_embedding.weight"] = bad["token_embedding.weight"][:-1]
    paths = [write("good", good), write("bad", bad)]

    def no_reads(*args: object) -> None:
        raise AssertionError("tensor data was read before validation")

    monkeypatch.setattr(SafetensorsReader, "read", no_reads)
    with pytest.raises(ValueError, match=r"bad.safetensors: key 'token_embedding.weight' has shape \[19, 16\]"):
        merge(clip_base, paths, "ties")


def test_a_floating_key_stored_as_integers_is_rejected(clip_base, write):
    expert = {**clip_base, "logit_scale": torch.tensor(4)}
    with pytest.raises(
        ValueError, match=r"key 'logit_scale' has dtype torch.int64 but the base base has torch.float32"
    ):
        merge(clip_base, [write("e", expert)], "average")


def test_a_corrupt_header_names_the_file(tmp_path, clip_base):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(ValueError, match=rf"{path}: the safetensors header is not valid JSON"):
        merge(clip_base, [path], "average")
    path.write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(ValueError, match=r"header length .* exceeds the file size"):
        merge(clip_base, [path], "average")


def test_a_truncated_file_names_the_file_and_tensor(clip_base, write):
    path = write("cut", clip_base)
    os.truncate(path, os.path.getsize(path) - 4)
    with pytest.raises(ValueError, match=rf"{path}: the file is truncated: tensor '.*' ends at byte .* holds only"):
        merge(clip_base, [path], "average")


def test_non_floating_tensors_and_skipped_keys_come_from_the_base(clip_base, perturbed):
    base = {**clip_base, "position_ids": torch.arange(5)}
    experts = [{**expert, "position_ids": torch.arange(5) * 7} for expert in perturbed(clip_base, 2)]
    out = merge(base, experts, "ties", skip=["logit_scale", "visual.ln_*"])
    assert torch.equal(out["position_ids"], base["position_ids"])
    assert torch.equal(out["logit_scale"], base["logit_scale"])
    assert torch.equal(out["visual.ln_post.bias"], base["visual.ln_post.bias"])
    assert not torch.equal(out["ln_final.bias"], base["ln_final.bias"])
    with pytest.raises(ValueError, match=r"skip pattern 'logit_scal' matches no key .* did you mean 'logit_scale'"):
        merge(base, experts, "ties", skip=["logit_scal"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_output_keeps_the_base_dtype_and_computes_in_float32(clip_base, perturbed, write, dtype):
    low = lambda sd: {key: value.to(dtype) for key, value in sd.items()}  # noqa: E731
    base, experts = low(clip_base), [low(expert) for expert in perturbed(clip_base, 2, scale=0.05)]
    out = merge(write("base", base), [write(f"e{i}", e) for i, e in enumerate(experts)], "ties")
    # The same numbers upcast first: the merge must be that float32 merge, rounded once at the end.
    up = lambda sd: {key: value.float() for key, value in sd.items()}  # noqa: E731
    upcast = merge(up(base), [up(expert) for expert in experts], "ties")
    for key in clip_base:
        assert out[key].dtype == dtype
        assert torch.equal(out[key], upcast[key].to(dtype))


def test_experts_in_another_floating_dtype_are_accepted(clip_base, perturbed):
    experts = [{k: v.to(torch.bfloat16) for k, v in e.items()} for e in perturbed(clip_base, 2)]
    out = merge(clip_base, experts, "average")
    assert all(out[key].dtype == torch.float32 for key in out)


def test_every_file_is_closed_after_a_merge(clip_base, perturbed, write):
    paths = [write(f"e{i}", expert) for i, expert in enumerate(perturbed(clip_base, 3))]
    before = set(os.listdir("/proc/self/fd"))
    merge(write("base", clip_base), paths, "ties")
    with pytest.raises(ValueError):
        merge(clip_base, [*paths, write("short", {"w": torch.zeros(1)})], "ties")
    assert set(os.listdir("/proc/self/fd")) == before


def test_the_thread_setting_is_restored_after_a_merge(clip_base, perturbed):
    before = torch.get_num_threads()
    merge(clip_base, perturbed(clip_base, 2), "ties", threads=1)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        merge(clip_base, perturbed(clip_base, 2), "ties", threads=0)
    assert torch.get_num_threads() == before
