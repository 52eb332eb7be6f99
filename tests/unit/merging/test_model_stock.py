"""Model stock (arXiv 2403.19522) against its formula in MERGING.md, computed here from the definition in float64.

Per tensor: cos = mean over pairs i < j of cos(tau_i, tau_j); t = N cos / (1 + (N - 1) cos);
theta = t mean(theta_i) + (1 - t) theta_0; zero task vectors dropped first.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml

from timelit.merging import merge, validate
from timelit.training.protocol import pairwise

CONFIG = Path(__file__).parents[3] / "configs" / "protocols" / "ema_ema_model_stock.yaml"


def model_stock(base: dict, experts: list[dict]) -> dict:
    """The definition, tensor by tensor, with every pairwise cosine formed explicitly."""
    out = {}
    for key, theta_0 in base.items():
        taus = [(expert[key] - theta_0).double().flatten() for expert in experts]  # tau in float32, as specified
        kept = [(expert[key].double(), tau) for expert, tau in zip(experts, taus, strict=True) if tau.any()]
        if len(kept) < 2:
            out[key] = kept[0][0].float() if kept else theta_0.clone()
            continue
        n = len(kept)
        cosines = [a @ b / (a.norm() * b.norm()) for (_, a), (_, b) in itertools.combinations(kept, 2)]
        cos = float(sum(cosines)) / len(cosines)
        t = n * cos / (1 + (n - 1) * cos)
        mean = sum(theta for theta, _ in kept) / n
        out[key] = (t * mean + (1 - t) * theta_0.double()).float()
    return out


def _related(clip_base: dict, perturbed, n: int) -> list[dict]:
    """n experts that share a direction (pairwise cos ~ 0.5), so t is far from 0 and 1."""
    (common,) = perturbed(clip_base, 1, seed=11)
    return perturbed(common, n, seed=12)


def _close(a: dict, b: dict) -> None:
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6)


@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("chunk_size", [100, 1 << 22])
def test_model_stock_is_its_formula(clip_base, perturbed, n, chunk_size):
    experts = _related(clip_base, perturbed, n)
    out = merge(clip_base, experts, "model_stock", chunk_size=chunk_size)
    _close(out, model_stock(clip_base, experts))
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    mean = sum(expert[key] for expert in experts) / n
    assert (out[key] - clip_base[key]).norm() < 0.95 * (mean - clip_base[key]).norm()  # pulled toward theta_0


def test_the_ratio_on_hand_made_task_vectors():
    base = {"w": torch.zeros(2)}
    # cos = 0.6: t = 2 * 0.6 / 1.6 = 0.75; mean tau = [0.8, 0.4]; theta = 0.75 * [0.8, 0.4].
    out = merge(base, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.6, 0.8])}], "model_stock")["w"]
    torch.testing.assert_close(out, torch.tensor([0.6, 0.3]))
    # Orthogonal task vectors: cos = 0, t = 0, theta_0.
    out = merge(base, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 3.0])}], "model_stock")["w"]
    assert out.tolist() == [0.0, 0.0]
    # Three collinear task vectors: cos = 1, t = 1, the mean.
    experts = [{"w": torch.tensor([c, c])} for c in (1.0, 2.0, 3.0)]
    torch.testing.assert_close(merge(base, experts, "model_stock")["w"], torch.tensor([2.0, 2.0]))
    # Opposite task vectors cancel: 1 + (N - 1) cos = 0, no value; timelit's documented choice is theta_0.
    opposite = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([-1.0, -2.0])}]
    assert merge(base, opposite, "model_stock")["w"].tolist() == [0.0, 0.0]


def test_identical_experts_come_back_exactly(clip_base, perturbed):
    (expert,) = perturbed(clip_base, 1)
    out = merge(clip_base, [expert] * 3, "model_stock", chunk_size=100)
    assert all(torch.equal(out[key], expert[key]) for key in clip_base)


def test_a_zero_task_vector_is_dropped(clip_base, perturbed):
    experts = _related(clip_base, perturbed, 2)
    # The first EMA step: m_0 = theta_0 is dropped and the expert comes back as it is (the pipeline: theta_0).
    out = merge(clip_base, [clip_base, experts[0]], "model_stock")
    assert all(torch.equal(out[key], experts[0][key]) for key in clip_base)
    # With two others left, it is their model stock, N = 2.
    with_base = merge(clip_base, [experts[0], clip_base, experts[1]], "model_stock")
    without = merge(clip_base, experts, "model_stock")
    assert all(torch.equal(with_base[key], without[key]) for key in clip_base)
    # None left: theta_0.
    out = merge(clip_base, [clip_base, clip_base], "model_stock")
    assert all(torch.equal(out[key], clip_base[key]) for key in clip_base)


def test_zero_task_vectors_are_dropped_per_tensor(clip_base, perturbed):
    experts = _related(clip_base, perturbed, 3)
    key = "visual.proj"
    experts[1][key] = clip_base[key].clone()  # expert 1 left this tensor untouched
    out = merge(clip_base, experts, "model_stock")
    _close(out, model_stock(clip_base, experts))
    _close({key: out[key]}, model_stock({key: clip_base[key]}, [{key: experts[i][key]} for i in (0, 2)]))
    other = "visual.conv1.weight"  # every other tensor still merges all three
    _close({other: out[other]}, model_stock({other: clip_base[other]}, [{other: e[other]} for e in experts]))


def test_model_stock_needs_two_experts_and_takes_no_hyperparameters(clip_base, perturbed):
    with pytest.raises(ValueError, match="model_stock merges at least 2 experts, got 1"):
        merge(clip_base, perturbed(clip_base, 1), "model_stock")
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'eps' for 'model_stock' \(timelit's model stock"):
        validate("model_stock", {"eps": 1e-8})


def test_the_ema_step_from_theta_0_starts_at_the_first_expert(clip_base, perturbed):
    """TIME's ema/ema with model stock: m_1 = theta_1 (not theta_0 forever), then the model stock of the pair."""
    protocol = yaml.safe_load(CONFIG.read_text())["protocol"]
    assert (protocol["init"], protocol["deploy"], protocol["technique"]) == ("ema", "ema", "model_stock")
    first, second = _related(clip_base, perturbed, 2)
    m_1 = pairwise(clip_base, clip_base, first, "model_stock", {}, 0.5)
    assert all(torch.equal(m_1[key], first[key]) for key in clip_base)
    m_2 = pairwise(clip_base, m_1, second, "model_stock", {}, 0.5)
    _close(m_2, model_stock(clip_base, [first, second]))
