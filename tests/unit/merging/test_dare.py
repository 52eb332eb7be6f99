"""DARE masks: reproducible from the seed, whatever the chunking or order, and unbiased."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from timelit.merging import merge, validate
from timelit.merging.dare import BLOCK, keep_mask


def test_mask_slices_agree_with_the_whole_mask_in_any_order():
    n = 3 * BLOCK + 123
    whole = keep_mask(0, 2, "token_embedding.weight", 0, n, p=0.7)
    cuts = [0, 5, BLOCK - 1, BLOCK + 7, 2 * BLOCK, n]
    pieces = {a: keep_mask(0, 2, "token_embedding.weight", a, b, p=0.7) for a, b in reversed(list(pairwise(cuts)))}
    assert torch.equal(torch.cat([pieces[a] for a in cuts[:-1]]), whole)


def test_a_short_draw_is_the_start_of_a_long_one():
    """keep_mask draws each block only as far as it needs; that is sound only while this holds."""
    long = torch.rand(BLOCK, generator=torch.Generator().manual_seed(7))
    for n in (1, 15, 16, 17, 1000, BLOCK - 1):
        assert torch.equal(torch.rand(n, generator=torch.Generator().manual_seed(7)), long[:n])


def test_masks_differ_between_experts_tensors_and_seeds():
    reference = keep_mask(0, 0, "a", 0, 1000, p=0.5)
    for other in (
        keep_mask(0, 1, "a", 0, 1000, p=0.5),
        keep_mask(0, 0, "b", 0, 1000, p=0.5),
        keep_mask(1, 0, "a", 0, 1000, p=0.5),
    ):
        assert not torch.equal(reference, other)


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_merge_is_the_same_for_every_chunk_size_and_reproducible(clip_base, perturbed, method):
    experts = perturbed(clip_base, 3)
    reference = merge(clip_base, experts, method, p=0.7, seed=5)
    for chunk_size in (7, 1000, 1 << 22):
        again = merge(clip_base, experts, method, p=0.7, seed=5, chunk_size=chunk_size)
        assert all(torch.equal(again[key], reference[key]) for key in clip_base)
    other_seed = merge(clip_base, experts, method, p=0.7, seed=6)
    assert not all(torch.equal(other_seed[key], reference[key]) for key in clip_base)


def test_an_experts_mask_does_not_depend_on_the_tensors_processed_before_it(clip_base, perturbed):
    (expert,) = perturbed(clip_base, 1)
    whole = merge(clip_base, [expert], "dare", p=0.5, seed=0)
    key = "transformer.resblocks.1.mlp.c_fc.weight"
    alone = merge({key: clip_base[key]}, [{key: expert[key]}], "dare", p=0.5, seed=0)
    assert torch.equal(alone[key], whole[key])


def test_rescaling_keeps_the_task_vector_in_expectation():
    tau = torch.ones(200_000)
    out = merge({"w": torch.zeros_like(tau)}, [{"w": tau}], "dare", p=0.9, seed=0)["w"]
    assert set(out.unique().tolist()) <= {0.0, 10.0}  # dropped, or kept and multiplied by 1 / (1 - 0.9)
    assert abs(out.mean().item() - 1.0) < 0.03  # sd of the mean: sqrt(0.9 * 0.1 / 2e5) * 10 = 0.0067


def test_dare_and_dare_ties_use_the_documented_masks():
    generator = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(5000)}
    experts = [{"w": torch.randn(5000, generator=generator)} for _ in range(3)]
    dropped = [
        torch.where(keep_mask(9, i, "w", 0, 5000, p=0.6), expert["w"] / 0.4, 0.0) for i, expert in enumerate(experts)
    ]
    assert torch.equal(merge(base, experts, "dare", p=0.6, seed=9)["w"], dropped[0] + dropped[1] + dropped[2])
    stacked = torch.stack(dropped)
    sign = torch.sign(stacked.sum(0))
    agree = torch.where(sign > 0, stacked > 0, stacked < 0)
    expected = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(merge(base, experts, "dare_ties", p=0.6, seed=9)["w"], expected, rtol=1e-6, atol=0)


def test_dare_takes_a_scope_only_where_one_is_used(clip_base, perturbed):
    """DARE's masks are drawn entry by entry, so `dare` takes no statistic over a scope and rejects one; the scope
    still decides dare_ties' majority sign and where lines_alpha="auto" is computed."""
    with pytest.raises(ValueError, match="scope='tower' has no effect on dare"):
        validate("dare", {"scope": "tower"})
    validate("dare_ties", {"scope": "tower"})
    experts = perturbed(clip_base, 2)
    auto = {"lines": True, "lines_alpha": "auto", "seed": 1}
    per_tower = merge(clip_base, experts, "dare", scope="tower", **auto)
    whole = merge(clip_base, experts, "dare", scope="model", **auto)
    assert not all(torch.equal(per_tower[key], whole[key]) for key in clip_base)
