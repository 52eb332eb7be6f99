"""TIES: exact trim counts, the tie rule at the threshold, scopes, and agreement with the reference algorithm."""

from __future__ import annotations

import math

import pytest
import torch

from timelit.merging import merge
from timelit.merging.order_stats import largest


def _chunks(values: torch.Tensor, sizes: list[int]) -> list[tuple[int, torch.Tensor]]:
    pieces, start = [], 0
    for size in sizes:
        pieces.append((0, values[start : start + size]))
        start += size
    return pieces


@pytest.mark.parametrize("rank", [1, 2, 17, 500, 999, 1000])
def test_order_statistics_equal_kthvalue_with_ties_and_zeros(rank):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(1000, generator=generator).abs()
    values[:300] = 0.0  # many zeros
    values[300:400] = 0.5  # a run of equal magnitudes
    cuts = [1, 250, 3, 400, 346]  # an arbitrary cut into chunks; each pass gets fresh copies it may overwrite
    (found,) = largest(lambda: _chunks(values.clone(), cuts), n_experts=1, ranks=(rank,))
    assert found == (values.kthvalue(1000 - rank + 1).values.item(),)


def test_order_statistics_are_per_expert_and_rank_zero_keeps_nothing():
    a, b = torch.arange(10, dtype=torch.float32), torch.arange(10, 20, dtype=torch.float32)
    found = largest(lambda: [(0, a.clone()), (1, b.clone())], n_experts=2, ranks=(0, 1, 3))
    assert found == [(math.inf, 9.0, 7.0), (math.inf, 19.0, 17.0)]


@pytest.mark.parametrize(
    ("k", "n", "kept"), [(0.2, 1000, 200), (0.3, 10, 3), (0.25, 7, 2), (0.0, 50, 0), (1.0, 50, 50)]
)
def test_ties_keeps_exactly_ceil_k_n_entries_when_magnitudes_are_distinct(k, n, kept):
    tau = torch.randperm(n, generator=torch.Generator().manual_seed(1)).float() + 1  # distinct magnitudes 1..n
    tau[::2] *= -1
    out = merge({"w": torch.zeros(n)}, [{"w": tau}], "ties", k=k, chunk_size=3)["w"]
    assert int((out != 0).sum()) == kept
    assert torch.equal(out[out != 0].abs().sort().values, torch.arange(n - kept + 1, n + 1).float())


def test_ties_keeps_every_entry_tied_with_the_threshold():
    # k = 0.4 of 5 entries -> the 2nd largest magnitude, 2, is the threshold; all three 2s are kept.
    tau = torch.tensor([4.0, -2.0, 2.0, 2.0, 1.0])
    out = merge({"w": torch.zeros(5)}, [{"w": tau}], "ties", k=0.4)["w"]
    assert out.tolist() == [4.0, -2.0, 2.0, 2.0, 0.0]


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_a_zero_sum_whose_majority_is_zero_too_leaves_the_base(scope):
    # Both entries sum to 0 (1 - 1 and -1 + 1), so neither elects a sign and the scope's sum of signs is 0 as well:
    # no side wins and the base stays. The reference code would add the negative side's mean, -1, to both.
    base = {"w": torch.tensor([0.5, 2.0])}
    experts = [{"w": base["w"] + torch.tensor([1.0, -1.0])}, {"w": base["w"] + torch.tensor([-1.0, 1.0])}]
    assert torch.equal(merge(base, experts, "ties", k=1.0, scope=scope)["w"], base["w"])


def _reference_ties(base: dict, experts: list[dict], k: float, keys: list[str]) -> torch.Tensor:
    """TIES as shared/MERGING.md specifies it, computed the naive way, on a stacked, flattened matrix with kthvalue.

    It follows the reference code (prateeky2806/ties-merging) except where timelit deliberately differs (ties.py):
    the trim keeps |tau| >= the ceil(k n)-th largest (the reference: kthvalue(n - int(n k)), the floor(k n) + 1-th
    largest, one more entry whenever k n is an integer), and a zero sum whose majority sign is 0 as well stays 0
    (the reference takes the negative side's mean there).
    """
    flat = lambda sd: torch.cat([sd[key].reshape(-1) for key in keys])  # noqa: E731
    stacked = torch.stack([flat(expert) - flat(base) for expert in experts])
    n = stacked.shape[1]
    threshold = stacked.abs().kthvalue(n - math.ceil(k * n) + 1, dim=1, keepdim=True).values
    trimmed = stacked * (stacked.abs() >= threshold)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * (trimmed.sign() * sign > 0)  # agreeing nonzero entries; none where the sign stayed 0
    return flat(base) + selected.sum(0) / (selected != 0).sum(0).clamp(min=1)


@pytest.mark.parametrize("scope", ["model", "tower", "tensor"])
def test_ties_matches_the_reference_algorithm_in_every_scope(clip_base, perturbed, towers, scope):
    experts = perturbed(clip_base, 4)
    experts[1]["visual.proj"] = clip_base["visual.proj"] - (experts[0]["visual.proj"] - clip_base["visual.proj"])
    out = merge(clip_base, experts, "ties", k=0.3, scope=scope, chunk_size=100)
    groups = {
        "model": [list(clip_base)],
        "tower": [list(tower) for tower in towers(clip_base)],
        "tensor": [[k] for k in clip_base],
    }[scope]
    for keys in groups:
        expected = _reference_ties(clip_base, experts, 0.3, keys)
        got = torch.cat([out[key].reshape(-1) for key in keys])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_tower_scope_equals_merging_each_tower_on_its_own(clip_base, perturbed, towers):
    experts = perturbed(clip_base, 3)
    together = merge(clip_base, experts, "ties", k=0.2, scope="tower")
    for tower, *expert_towers in zip(towers(clip_base), *map(towers, experts), strict=True):
        alone = merge(tower, expert_towers, "ties", k=0.2, scope="model")
        assert all(torch.equal(together[key], alone[key]) for key in alone)


def test_scope_decides_whether_a_quiet_tower_survives_the_trim(clip_base, perturbed):
    (expert,) = perturbed(clip_base, 1, scale=0.001)
    for key in expert:
        if key.startswith("visual."):
            expert[key] = clip_base[key] + 1.0  # the visual tower's task vector dwarfs the text tower's
    n_visual = sum(v.numel() for k, v in clip_base.items() if k.startswith("visual."))
    k = 0.5 * n_visual / sum(v.numel() for v in clip_base.values())
    changed = lambda out: any(not torch.equal(out[key], clip_base[key]) for key in out if not key.startswith("visual."))  # noqa: E731
    assert not changed(merge(clip_base, [expert], "ties", k=k, scope="model"))  # the whole top-k goes to vision
    assert changed(merge(clip_base, [expert], "ties", k=k, scope="tower"))
