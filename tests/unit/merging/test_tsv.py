"""TSV-Merge (arXiv 2412.00081) against MERGING.md's formula, computed here in float64 with torch.linalg.svd.

Per matrix: keep each tau_i's top k = max(1, floor(r / N)) singular triplets, stack the U and V columns of all
experts, replace each stack by P Q^T of its SVD, tau = U_perp diag(s) V_perp^T; other tensors: the mean tau_i.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from timelit.merging import merge, validate
from timelit.merging.tsv import tsv_factors
from timelit.training.protocol import pairwise

CONFIG = Path(__file__).parents[3] / "configs" / "protocols" / "ema_ema_tsv.yaml"


def matrix(key: str, shape: torch.Size) -> bool:
    """MERGING.md's matrices: linear maps, not embedding tables, vectors or convolutions."""
    return len(shape) == 2 and min(shape) >= 2 and "embedding" not in key


def polar(stack: torch.Tensor) -> torch.Tensor:
    left, _, right = torch.linalg.svd(stack, full_matrices=False)
    return left @ right


def tsv(base: dict, experts: list[dict], lam: float = 1.0) -> dict:
    """The definition, tensor by tensor, in float64; zero task vectors dropped per tensor first."""
    out = {}
    for key, theta_0 in base.items():
        taus = [(expert[key] - theta_0).double() for expert in experts]  # tau in float32, as specified
        kept = [tau for tau in taus if tau.any()]
        if not kept:
            tau = torch.zeros_like(theta_0, dtype=torch.float64)
        elif not matrix(key, theta_0.shape):
            tau = sum(kept) / len(kept)
        elif len(kept) == 1:
            tau = kept[0]
        else:
            k = max(1, min(theta_0.shape) // len(kept))
            factors = [torch.linalg.svd(tau, full_matrices=False) for tau in kept]
            u = polar(torch.cat([f.U[:, :k] for f in factors], dim=1))
            v = polar(torch.cat([f.Vh[:k].T for f in factors], dim=1))
            tau = u @ torch.diag(torch.cat([f.S[:k] for f in factors])) @ v.T
        out[key] = (theta_0.double() + lam * tau).float()
    return out


@pytest.mark.parametrize("n", [2, 3, 8])
def test_tsv_is_its_formula(close, clip_base, perturbed, n):
    experts = perturbed(clip_base, n)
    close(merge(clip_base, experts, "tsv"), tsv(clip_base, experts))
    close(merge(clip_base, experts, "tsv", lam=0.4), tsv(clip_base, experts, lam=0.4))


def test_more_experts_than_the_rank_keep_one_triplet_each(close, perturbed):
    """r = 4 < N = 6: each expert keeps k = 1 (FusionBench would keep 0 and lose the matrix)."""
    base = {"w": torch.randn(12, 4, generator=torch.Generator().manual_seed(0))}
    experts = perturbed(base, 6)
    out = merge(base, experts, "tsv")["w"]
    close({"w": out}, tsv(base, experts))
    assert (out - base["w"]).abs().max() > 1e-3


def test_the_stacked_bases_are_orthonormal_and_carry_each_tasks_top_singular_values():
    generator = torch.Generator().manual_seed(0)
    taus = [torch.randn(40, 24, generator=generator) for _ in range(3)]
    left, values, right = tsv_factors(iter(taus), 3)
    assert left.shape == (40, 24) and right.shape == (24, 24)  # 3 experts x k = 8 columns each
    torch.testing.assert_close(left.T @ left, torch.eye(24), rtol=0, atol=1e-5)
    torch.testing.assert_close(right.T @ right, torch.eye(24), rtol=0, atol=1e-5)
    expected = torch.cat([torch.linalg.svdvals(tau)[:8] for tau in taus])
    torch.testing.assert_close(values, expected)


def test_tasks_in_orthogonal_subspaces_merge_to_the_sum_of_their_truncations():
    """When the tasks' singular vectors are already mutually orthogonal the whitening changes nothing: TSV is the
    sum of each task's rank-k truncation (k = floor(12 / 3) = 4)."""
    generator = torch.Generator().manual_seed(1)
    base = {"w": torch.zeros(12, 12)}
    experts, truncated = [], torch.zeros(12, 12)
    for i in range(3):
        block = torch.randn(4, 4, generator=generator)
        expert = torch.zeros(12, 12)
        expert[4 * i : 4 * i + 4, 4 * i : 4 * i + 4] = block  # rank 4, in its own rows and columns
        experts.append({"w": expert})
        truncated += expert
    torch.testing.assert_close(merge(base, experts, "tsv")["w"], truncated, rtol=0, atol=1e-5)


def plus(base: dict, expert: dict, lam: float = 1.0) -> dict:
    """theta_0 + lam * tau in float32, rounded as the engine rounds."""
    return {key: (expert[key] - base[key]).mul_(lam).add_(base[key]) for key in base}


def test_one_expert_is_its_task_vector_and_zero_task_vectors_are_dropped(clip_base, perturbed):
    experts = perturbed(clip_base, 2)
    out, expected = merge(clip_base, experts[:1], "tsv"), plus(clip_base, experts[0])
    assert all(torch.equal(out[key], expected[key]) for key in clip_base)
    # theta_0 among the experts is dropped: the merge of the other two, per tensor.
    with_base = merge(clip_base, [experts[0], clip_base, experts[1]], "tsv")
    without = merge(clip_base, experts, "tsv")
    assert all(torch.equal(with_base[key], without[key]) for key in clip_base)
    out = merge(clip_base, [clip_base, clip_base], "tsv")
    assert all(torch.equal(out[key], clip_base[key]) for key in clip_base)


def test_only_matrices_are_decomposed(clip_base, perturbed):
    experts = perturbed(clip_base, 3)
    out = merge(clip_base, experts, "tsv")
    for key in ("token_embedding.weight", "visual.positional_embedding", "visual.conv1.weight", "ln_final.bias"):
        mean = clip_base[key] + sum(expert[key] - clip_base[key] for expert in experts) / 3
        torch.testing.assert_close(out[key], mean, rtol=0, atol=1e-7)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert (out[key] - (clip_base[key] + sum(e[key] - clip_base[key] for e in experts) / 3)).abs().max() > 1e-3


def test_the_ema_config_runs_tsv_pairwise(close, clip_base, perturbed):
    protocol = yaml.safe_load(CONFIG.read_text())["protocol"]
    assert (protocol["init"], protocol["deploy"], protocol["technique"]) == ("ema", "ema", "tsv")
    assert validate("tsv", protocol["hparams"]).hparams()["lam"] == 0.5
    first, second = perturbed(clip_base, 2)
    # theta_0's zero task vector is dropped: m_1 = theta_0 + tau_1 / 2, the 0.5 / 0.5 EMA's m_1.
    m_1 = pairwise(clip_base, clip_base, first, "tsv", protocol["hparams"], 0.5)
    expected = plus(clip_base, first, 0.5)
    assert all(torch.equal(m_1[key], expected[key]) for key in clip_base)
    m_2 = pairwise(clip_base, m_1, second, "tsv", protocol["hparams"], 0.5)
    close(m_2, tsv(clip_base, [m_1, second], lam=0.5))


def test_tsv_hyperparameters_are_checked():
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'alpha' for 'tsv' \(TSV-Merge's scaling factor"):
        validate("tsv", {"alpha": 0.5})
    with pytest.raises(ValueError, match="lam must be a finite number"):
        validate("tsv", {"lam": "1"})
