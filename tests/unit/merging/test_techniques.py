"""Hand-computed merges on 4-entry tensors, one per technique, and the properties a user relies on.

Values are dyadic (exact in float32), so the expected results are exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from timelit.merging import TECHNIQUES, merge

BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
TAU_1 = torch.tensor([1.0, -2.0, 0.5, 0.0])
TAU_2 = torch.tensor([3.0, 2.0, -0.25, 0.0])
EXPERTS = [{"w": BASE["w"] + TAU_1}, {"w": BASE["w"] + TAU_2}]  # [2, -1, 1.5, 1] and [4, 3, 0.75, 1]


def merged(method: str, experts: list = EXPERTS, **hparams: object) -> list[float]:
    return merge(BASE, experts, method, **hparams)["w"].tolist()


def test_average_uniform_and_weighted():
    assert merged("average") == [3.0, 1.0, 1.125, 1.0]
    assert merged("average", weights=[0.25, 0.75]) == [3.5, 2.0, 0.9375, 1.0]


def test_average_rejects_weights_that_do_not_sum_to_one_unless_normalized():
    with pytest.raises(ValueError, match=r"sum to 2\.0, not 1; pass normalize=True"):
        merged("average", weights=[1.0, 1.0])
    assert merged("average", weights=[1.0, 3.0], normalize=True) == [3.5, 2.0, 0.9375, 1.0]
    with pytest.raises(ValueError, match="got 3 weights for 2 experts"):
        merged("average", weights=[0.5, 0.25, 0.25])


def test_interpolation_weights_the_newer_model_by_w():
    assert merged("interpolation", w=0.25) == [2.5, 0.0, 1.3125, 1.0]
    assert merged("interpolation") == merged("average")  # w = 0.5 default: the TIME EMA
    with pytest.raises(ValueError, match="exactly 2 experts, got 3"):
        merged("interpolation", experts=[*EXPERTS, EXPERTS[0]])


def test_task_arithmetic_sums_task_vectors():
    assert merged("task_arithmetic") == [5.0, 1.0, 1.25, 1.0]
    assert merged("task_arithmetic", lam=0.5) == [3.0, 1.0, 1.125, 1.0]


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    # k = 0.5 keeps the top 2 of 4 per expert: tau_1 -> [1, -2, 0, 0], tau_2 -> [3, 2, 0, 0].
    # Entry 0: both positive, mean 2. Entry 1: -2 + 2 = 0, so it takes the majority sign of the elected signs
    # (one +1 elsewhere) and averages the positive entries: 2. Entries 2-3 were trimmed.
    assert merged("ties", k=0.5) == [3.0, 3.0, 1.0, 1.0]
    assert merged("ties", k=0.5, lam=0.5) == [2.0, 2.0, 1.0, 1.0]


def test_ties_zero_sum_takes_the_negative_majority():
    experts = [{"w": BASE["w"] + torch.tensor([-1.0, -2.0, 0.0, 0.0])}, {"w": BASE["w"] + TAU_2}]
    # k = 0.5: [-1, -2, 0, 0] and [3, 2, 0, 0]; entry 0 sums to +2 -> mean 3; entry 1 sums to 0 -> majority +1 -> 2.
    assert merged("ties", experts=experts, k=0.5) == [4.0, 3.0, 1.0, 1.0]
    experts = [{"w": BASE["w"] + torch.tensor([-4.0, -2.0, 0.0, 0.0])}, {"w": BASE["w"] + TAU_2}]
    # entry 0 sums to -1 -> elected -1 -> mean of negatives -4; entry 1 -> majority -1 -> -2.
    assert merged("ties", experts=experts, k=0.5) == [-3.0, -1.0, 1.0, 1.0]


def test_magmax_keeps_the_largest_magnitude_and_gives_ties_to_the_later_expert():
    # entry 1: |-2| == |2| -> the later expert's +2; entry 3: 0 vs 0.
    assert merged("magmax") == [4.0, 3.0, 1.5, 1.0]
    reversed_order = merge(BASE, EXPERTS[::-1], "magmax")["w"].tolist()
    assert reversed_order == [4.0, -1.0, 1.5, 1.0]


def test_breadcrumbs_drops_the_largest_and_smallest_magnitudes():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, 6.0, -7.0, 8.0, 9.0, -10.0]) / 16
    base = {"w": torch.zeros(10)}
    out = merge(base, [{"w": tau}], "breadcrumbs", top_drop=0.1, bottom_drop=0.3)["w"]
    assert out.tolist() == [0, 0, 0, -4 / 16, 5 / 16, 6 / 16, -7 / 16, 8 / 16, 9 / 16, 0]


def test_breadcrumbs_ties_elects_over_the_masked_vectors():
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor([1.0, -2.0, 4.0, 8.0])}, {"w": torch.tensor([2.0, 4.0, -8.0, 1.0])}]
    # top_drop 0.25 drops each expert's largest, bottom_drop 0.25 its smallest:
    # [0, -2, 4, 0] and [2, 4, 0, 0] -> entry 1: -2 + 4 > 0, so only the agreeing +4 counts.
    out = merge(base, experts, "breadcrumbs_ties", top_drop=0.25, bottom_drop=0.25)["w"]
    assert out.tolist() == [2.0, 4.0, 4.0, 0.0]


def test_dare_keeps_or_drops_each_entry_and_rescales_kept_ones():
    base = {"w": torch.zeros(1000)}
    tau = torch.linspace(-1, 1, 1000)
    out = merge(base, [{"w": tau}], "dare", p=0.75, seed=3)["w"]
    kept = out != 0
    assert torch.equal(out[kept], tau[kept] * 4)  # 1 / (1 - 0.75)
    assert 150 < int(kept.sum()) < 350  # Bernoulli(0.25) over 1000 entries: 250 +- 4.3 sigma


def test_slerp_of_orthogonal_tensors_follows_the_arc():
    base = {"w": torch.zeros(2)}
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    out = merge(base, [a, b], "slerp")["w"]
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))  # unit norm, not the lerp's 0.707/2
    out = merge(base, [a, b], "slerp", t=1 / 3)["w"]
    assert torch.allclose(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_slerp_of_nearly_parallel_tensors_is_the_lerp():
    base = {"w": torch.zeros(2)}
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 1 / 64])}  # cos = 0.99988 > 0.9995
    assert merge(base, [a, b], "slerp", t=0.25)["w"].tolist() == [1.0, 1 / 256]


def test_slerp_over_three_models_is_the_documented_running_fold():
    base = {"w": torch.zeros(3)}
    models = [{"w": torch.tensor(v)} for v in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])]
    first = merge(base, models[:2], "slerp", t=1 / 2)
    folded = merge(base, [first, models[2]], "slerp", t=1 / 3)
    assert torch.equal(merge(base, models, "slerp")["w"], folded["w"])
    with pytest.raises(ValueError, match="t applies to two models"):
        merge(base, models, "slerp", t=0.5)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "magmax"])
def test_lam_zero_returns_the_base(clip_base, perturbed, method):
    experts = perturbed(clip_base, 3)
    out = merge(clip_base, experts, method, lam=0.0)
    assert all(torch.equal(out[key], clip_base[key]) for key in clip_base)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("method", "n", "hparams"),
    [
        ("average", 3, {}),  # 1/3 is inexact: summed in float32, ~30% of the entries came back 1 ulp off
        ("average", 5, {}),
        ("average", 3, {"weights": [0.5, 0.3, 0.2]}),
        ("interpolation", 2, {"w": 0.3}),
        ("interpolation", 2, {"w": 0.7}),
        ("slerp", 2, {"t": 0.3}),
        ("slerp", 3, {}),  # the fold: t_j = 1/2, then 1/3
    ],
)
def test_merging_identical_experts_returns_them_exactly(clip_base, perturbed, method, n, hparams):
    (expert,) = perturbed(clip_base, 1)
    assert _same(merge(clip_base, [expert] * n, method, chunk_size=100, **hparams), expert)


def test_one_hot_weights_and_interpolation_ends_return_that_model_exactly(clip_base, perturbed):
    experts = perturbed(clip_base, 3)
    assert _same(merge(clip_base, experts, "average", weights=[0.0, 1.0, 0.0]), experts[1])
    assert _same(merge(clip_base, experts[:2], "interpolation", w=0.0), experts[0])
    assert _same(merge(clip_base, experts[:2], "interpolation", w=1.0), experts[1])


def test_average_is_the_exact_weighted_sum_rounded_once(clip_base, perturbed):
    base = {**clip_base, "big": torch.zeros(600_001)}  # longer than the kernel's 2^18-entry blocks
    experts, weights = perturbed(base, 5), [0.1, 0.3, 0.2, 0.15, 0.25]
    out = merge(base, experts, "average", weights=weights)
    for key in base:
        exact = sum(w * expert[key].double() for w, expert in zip(weights, experts, strict=True))
        assert torch.equal(out[key], exact.float())
    assert torch.equal(merge(base, experts, "average", weights=weights, chunk_size=70_000)["big"], out["big"])


def test_ties_with_k_one_and_one_expert_is_task_arithmetic(clip_base, perturbed):
    experts = perturbed(clip_base, 1)
    ties = merge(clip_base, experts, "ties", k=1.0)
    arithmetic = merge(clip_base, experts, "task_arithmetic")
    assert all(torch.equal(ties[key], arithmetic[key]) for key in clip_base)


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_with_p_zero_keeps_every_task_vector(clip_base, perturbed, method):
    experts = perturbed(clip_base, 3)
    dropped = merge(clip_base, experts, method, p=0.0)
    undropped = (
        merge(clip_base, experts, "task_arithmetic") if method == "dare" else merge(clip_base, experts, "ties", k=1.0)
    )
    assert all(torch.equal(dropped[key], undropped[key]) for key in clip_base)


def test_magmax_of_one_expert_is_that_expert(clip_base, perturbed):
    (expert,) = perturbed(clip_base, 1)
    out = merge(clip_base, [expert], "magmax")
    for key in clip_base:
        torch.testing.assert_close(out[key], expert[key], rtol=0, atol=1e-6)


def test_every_technique_leaves_its_inputs_untouched(clip_base, perturbed):
    experts = perturbed(clip_base, 2)
    before = [{k: v.clone() for k, v in sd.items()} for sd in (clip_base, *experts)]
    for method in TECHNIQUES:
        merge(clip_base, experts, method, chunk_size=50)
    for original, now in zip(before, (clip_base, *experts), strict=True):
        assert all(torch.equal(original[key], now[key]) for key in original)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "ties"])
def test_zero_element_tensors_pass_through_a_per_tensor_trim(clip_base, perturbed, method):
    experts = perturbed(clip_base, 2)
    empty = {"empty": torch.zeros(0, 4)}  # a scope of 0 entries under scope="tensor": nothing to trim
    out = merge({**clip_base, **empty}, [{**e, **empty} for e in experts], method, scope="tensor")
    assert out["empty"].shape == (0, 4) and out["empty"].dtype == torch.float32
    without = merge(clip_base, experts, method, scope="tensor")
    assert all(torch.equal(out[key], without[key]) for key in clip_base)
