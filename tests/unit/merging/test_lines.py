"""LiNeS: depth read per open_clip tower, the scale replacing lambda, on its own and on top of other techniques."""

from __future__ import annotations

import pytest
import torch

from timelit.merging import merge
from timelit.merging.lines import depth_ratios


def test_depth_is_counted_per_tower(clip_base):
    ratios = depth_ratios(clip_base)  # 3 visual blocks, 2 text blocks
    assert ratios["visual.transformer.resblocks.0.attn.in_proj_weight"] == 0.0
    assert ratios["visual.transformer.resblocks.1.mlp.c_fc.weight"] == 0.5
    assert ratios["visual.transformer.resblocks.2.ln_2.bias"] == 1.0
    assert ratios["transformer.resblocks.0.attn.out_proj.weight"] == 0.0
    assert ratios["transformer.resblocks.1.mlp.c_proj.bias"] == 1.0
    assert {"visual.proj", "token_embedding.weight", "logit_scale", "ln_final.weight"}.isdisjoint(ratios)


def _as_clip_key(key: str) -> str:
    """CLIP's key for a CustomTextCLIP tensor: the text tower's keys lose their ``text.`` prefix."""
    return key.removeprefix("text.")


def test_depth_is_counted_per_tower_in_both_open_clip_layouts(clip_base, custom_text_clip_base):
    assert "text.transformer.resblocks.1.mlp.c_proj.bias" in custom_text_clip_base  # the layout under test
    ratios = depth_ratios(custom_text_clip_base)
    assert ratios["text.transformer.resblocks.0.attn.out_proj.weight"] == 0.0
    assert ratios["text.transformer.resblocks.1.mlp.c_proj.bias"] == 1.0  # L = 2 for text, not the visual 3
    assert ratios["visual.transformer.resblocks.1.mlp.c_fc.weight"] == 0.5
    assert {_as_clip_key(key): ratio for key, ratio in ratios.items()} == depth_ratios(clip_base)


def test_lines_on_custom_text_clip_scales_the_text_tower_as_on_clip(clip_base, custom_text_clip_base, perturbed):
    experts = perturbed(custom_text_clip_base, 2)
    custom = merge(custom_text_clip_base, experts, "lines", alpha=0.25, beta=0.5)
    rename = lambda sd: {_as_clip_key(key): value for key, value in sd.items()}  # noqa: E731
    plain = merge(rename(custom_text_clip_base), [rename(e) for e in experts], "lines", alpha=0.25, beta=0.5)
    assert plain.keys() == clip_base.keys()
    assert all(torch.equal(custom[key], plain[_as_clip_key(key)]) for key in custom)


def test_lines_scales_each_key_by_its_depth_in_its_own_tower(clip_base):
    zeros = {key: torch.zeros_like(value) for key, value in clip_base.items()}
    ones = {key: torch.ones_like(value) for key, value in clip_base.items()}  # tau = 1 everywhere
    out = merge(zeros, [ones], "lines", alpha=0.25, beta=0.5)
    scale = {key: out[key].unique().tolist() for key in clip_base}
    assert scale["visual.transformer.resblocks.1.attn.in_proj_weight"] == pytest.approx([0.5])  # 0.25 + 0.5 / 2
    assert scale["visual.transformer.resblocks.2.attn.in_proj_weight"] == pytest.approx([0.75])
    assert scale["transformer.resblocks.1.attn.in_proj_weight"] == pytest.approx([0.75])  # text: L = 2
    for key in ("visual.transformer.resblocks.0.ln_1.weight", "visual.conv1.weight", "logit_scale", "text_projection"):
        assert scale[key] == pytest.approx([0.25])


@pytest.mark.parametrize("method", ["ties", "dare", "breadcrumbs", "task_arithmetic"])
def test_the_lines_flag_applies_the_same_scaling_on_top_of_other_techniques(clip_base, perturbed, method):
    experts = perturbed(clip_base, 1)
    neutral = {"ties": {"k": 1.0}, "dare": {"p": 0.0}, "breadcrumbs": {"top_drop": 0.0, "bottom_drop": 0.0}}
    flagged = merge(clip_base, experts, method, lines=True, lines_alpha=0.3, lines_beta=0.6, **neutral.get(method, {}))
    plain = merge(clip_base, experts, "lines", alpha=0.3, beta=0.6)
    assert all(torch.equal(flagged[key], plain[key]) for key in clip_base)


def test_auto_alpha_on_task_arithmetic_is_one_over_n(clip_base, perturbed):
    experts = perturbed(clip_base, 4)
    auto = merge(clip_base, experts, "lines", alpha="auto", beta=0.0)
    mean = merge(clip_base, experts, "task_arithmetic", lam=0.25)
    for key in clip_base:
        torch.testing.assert_close(auto[key], mean[key], rtol=1e-6, atol=1e-7)


def test_auto_alpha_is_taken_per_scope(clip_base, perturbed, towers):
    experts = perturbed(clip_base, 2)
    together = merge(clip_base, experts, "ties", k=0.2, scope="tower", lines=True, lines_alpha="auto")
    for tower, *expert_towers in zip(towers(clip_base), *map(towers, experts), strict=True):
        alone = merge(tower, expert_towers, "ties", k=0.2, lines=True, lines_alpha="auto")
        for key in alone:
            torch.testing.assert_close(together[key], alone[key], rtol=1e-6, atol=1e-7)


def test_lam_and_lines_together_are_rejected():
    with pytest.raises(ValueError, match="the LiNeS scale replaces lambda"):
        merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], "ties", lines=True, lam=0.5)
    with pytest.raises(ValueError, match="need lines=True"):
        merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], "ties", lines_alpha=0.5)
