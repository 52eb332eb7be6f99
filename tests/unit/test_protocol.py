"""The protocol rules on their own, without Lightning: recency weights, the `all` merge, the pairwise step, settings
refused early, and what each task starts from, deploys and merges at its boundary."""

from __future__ import annotations

import pytest
import torch

from timelit.merging import ExpertStore, load_weights, merge
from timelit.merging.merged_files import MergedFiles
from timelit.training.protocol import (
    BASE,
    Expert,
    FoldAll,
    MergeAll,
    Pairwise,
    Planned,
    ProtocolSettings,
    Step,
    Stored,
    boundary_plan,
    check_technique,
    deployed_weights,
    init_weights,
    merge_all,
    pairwise,
    realise,
    recency_weights,
)


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
        ProtocolSettings(**settings)


def test_offline_merge_settings_are_accepted():
    settings = ProtocolSettings(init="zs", deploy="all", all_weighting="linear", all_include_base=True)
    assert settings.kinds == ("all",) and not settings.folds_all  # the recency-weighted average is merged again


@pytest.mark.parametrize("init", ["zs", "ft", "ema", "all", "ft_zs"])
def test_every_protocol_starts_the_first_task_from_the_models_own_weights(init):
    settings = ProtocolSettings(init=init, deploy="ft")
    assert init_weights(settings, 0) is None
    assert init_weights(settings, 3) == (BASE if init == "zs" else Stored(init, 2))
    assert deployed_weights(settings, 3) == Stored("ft", 3)


@pytest.mark.parametrize(
    ("settings", "kinds"),
    [
        ({"init": "ft", "deploy": "ft"}, ()),
        ({"init": "zs", "deploy": "ema"}, ("ema",)),
        ({"init": "all", "deploy": "ema"}, ("ema", "all")),
        ({"init": "ft_zs", "deploy": "all"}, ("all", "ft_zs")),
    ],
)
def test_a_boundary_writes_the_merged_kinds_init_and_deploy_read(settings, kinds):
    assert ProtocolSettings(**settings).kinds == kinds


def test_the_ema_starts_at_the_base_or_the_first_expert_and_steps_from_the_previous_ema():
    settings = ProtocolSettings(init="ema", deploy="ema", ema_weight=0.25)
    assert boundary_plan(settings, 0, [0]) == [Planned(("ema",), Pairwise(BASE, 0.25))]
    assert boundary_plan(settings, 2, [0, 1, 2]) == [Planned(("ema",), Pairwise(Stored("ema", 1), 0.25))]
    first = ProtocolSettings(init="ema", deploy="ema", ema_start="first_expert")
    assert boundary_plan(first, 0, [0]) == [Planned(("ema",), Expert())]


def test_all_merges_the_experts_up_to_the_task_or_folds_the_newest_into_the_previous_state():
    average = ProtocolSettings(init="zs", deploy="all", technique="average", all_weighting="linear")
    assert boundary_plan(average, 1, [0, 1, 2]) == [Planned(("all",), MergeAll((0, 1), "linear", False))]
    ties = ProtocolSettings(init="all", deploy="all", technique="ties", all_include_base=True)
    assert ties.folds_all
    assert boundary_plan(ties, 0, [0]) == [Planned(("all",), FoldAll((0,), None, 0, True))]
    assert boundary_plan(ties, 2, [0, 1, 2]) == [Planned(("all",), FoldAll((0, 1, 2), 1, 2, True))]


def test_a_sequential_technique_folds_once_for_ema_and_all_and_ft_zs_merges_the_expert_with_the_base():
    opcm = ProtocolSettings(init="all", deploy="ema", technique="opcm")
    assert opcm.sequential and not opcm.folds_all
    assert boundary_plan(opcm, 0, [0]) == [Planned(("ema", "all"), Step(None))]
    assert boundary_plan(opcm, 3, [0, 1, 2, 3]) == [Planned(("ema", "all"), Step(Stored("ema", 2)))]
    ft_zs = ProtocolSettings(init="ft_zs", deploy="ft_zs", ema_weight=0.3)
    assert boundary_plan(ft_zs, 4, range(5)) == [Planned(("ft_zs",), Pairwise(BASE, 0.3))]
    assert boundary_plan(ProtocolSettings(init="ft", deploy="ft"), 4, range(5)) == []


def _stream(settings, files, base, experts):
    """Every boundary of a stream as TimeMerge runs it: the expert stored, each planned merge realised and saved."""
    state = None
    for task, expert in enumerate(experts):
        files.store.add(task, expert)
        for planned in boundary_plan(settings, task, files.store.tasks):
            weights, state = realise(planned.rule, settings, base, expert, files, state)
            for kind in planned.kinds:
                files.save(kind, task, weights, {})
    return state


def test_realised_plans_are_the_ema_recurrence_and_the_merge_of_every_expert(tmp_path):
    base, *experts = models(0.0, 4.0, 8.0, 16.0)
    files = MergedFiles(ExpertStore(tmp_path), ("ema", "all"))
    settings = ProtocolSettings(init="ema", deploy="all", technique="task_arithmetic")
    _stream(settings, files, base, experts)
    # task arithmetic (lam 1) of the pair [m_{t-1}, θ_t] against θ0: m_t = m_{t-1} + θ_t - θ0 from m_0 = θ0
    assert torch.equal(load_weights(files.path("ema", 2))["w"], torch.full((3,), 28.0))
    assert torch.equal(load_weights(files.path("all", 2))["w"], merge(base, experts, "task_arithmetic")["w"])
    assert sorted(files.hashes) == [f"{kind}_{t:04d}.safetensors" for kind in ("all", "ema") for t in range(3)]


def test_a_realised_sequential_plan_is_the_technique_over_every_expert(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=generator), "b": torch.randn(4, generator=generator)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(3)]
    files = MergedFiles(ExpertStore(tmp_path), ("ema", "all"))
    state = _stream(ProtocolSettings(init="all", deploy="ema", technique="opcm"), files, base, experts)
    assert state is not None and state["count"] == 3
    over_all = merge(base, experts, "opcm")
    for kind in ("ema", "all"):
        written = load_weights(files.path(kind, 2))
        assert all(torch.equal(written[k], v) for k, v in over_all.items())
