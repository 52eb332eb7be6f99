"""The protocol rules on their own: recency weights, the `all` merge, the pairwise step, and settings refused early."""

from __future__ import annotations

import pytest
import torch

from timelit.callbacks.time_merge import TimeMerge
from timelit.protocol import check_technique, merge_all, pairwise, recency_weights


def models(*values: float) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.full((3,), v), "step": torch.tensor(7)} for v in values]


@pytest.mark.parametrize(
    ("weighting", "raw"),
    [
        ("uniform", [1, 1, 1]),
        ("linear", [1, 2, 3]),
        ("quadratic", [1, 4, 9]),
        ("fifth", [1, 32, 243]),
        ("tenth", [1, 1024, 59049]),
        ("exp", [1, 2, 4]),
        ("reverse_linear", [3, 2, 1]),
        ("reverse_tenth", [59049, 1024, 1]),
    ],
)
def test_recency_weights_are_the_pipelines_normalised_shapes(weighting, raw):
    assert recency_weights(3, weighting) == pytest.approx([r / sum(raw) for r in raw])


def test_all_is_the_recency_weighted_average_with_or_without_the_base():
    base, *experts = models(0.0, 1.0, 2.0, 4.0)
    merged = merge_all(base, experts, "interpolation", {}, weighting="linear")
    assert torch.allclose(merged["w"], torch.full((3,), (1 * 1 + 2 * 2 + 3 * 4) / 6))
    with_base = merge_all(base, experts, "average", {}, include_base=True)
    assert torch.allclose(with_base["w"], torch.full((3,), (0 + 1 + 2 + 4) / 4))
    assert torch.equal(merged["step"], base["step"])  # non-floating tensors come from θ0


def test_all_of_one_expert_is_that_expert_whatever_the_technique():
    base, expert = models(0.0, 3.0)
    assert torch.equal(merge_all(base, [expert], "ties", {"k": 0.3})["w"], expert["w"])


def test_the_pairwise_weight_belongs_to_the_newer_model():
    base, older, newer = models(0.0, 1.0, 5.0)
    assert torch.allclose(pairwise(base, older, newer, "interpolation", {}, 0.25)["w"], torch.full((3,), 2.0))
    assert torch.allclose(pairwise(base, older, newer, "average", {}, 0.25)["w"], torch.full((3,), 2.0))


@pytest.mark.parametrize(("technique", "name"), [("interpolation", "w"), ("slerp", "t"), ("average", "weights")])
def test_a_pair_weight_in_hparams_is_refused_for_ema_weight(technique, name):
    value = [0.5, 0.5] if name == "weights" else 0.3
    with pytest.raises(ValueError, match=rf"protocol.hparams.{name}(.|\n)*protocol.ema_weight"):
        check_technique(technique, {name: value})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"init": "ema", "deploy": "ema", "all_weighting": "linear"}, "all_weighting='linear' has no effect"),
        ({"init": "ema", "deploy": "ft", "all_include_base": True}, "all_include_base=True has no effect"),
        ({"init": "zs", "deploy": "all", "technique": "ties", "all_weighting": "linear"}, "weights an average"),
        ({"init": "zs", "deploy": "all", "ema_start": "first"}, "ema_start"),
        ({"init": "ema", "deploy": "ema", "ema_weight": 1.5}, "ema_weight"),
    ],
)
def test_settings_that_would_be_ignored_or_fail_later_are_refused_at_configuration(settings, message):
    with pytest.raises(ValueError, match=message):
        TimeMerge(**settings)


def test_offline_merge_settings_are_accepted_and_recorded():
    merge = TimeMerge(init="zs", deploy="all", all_weighting="linear", all_include_base=True)
    recorded = merge.run_record(None)["protocol"]
    assert recorded["all_weighting"] == "linear" and recorded["all_include_base"] is True
