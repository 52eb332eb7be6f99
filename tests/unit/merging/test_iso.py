"""Iso-C and Iso-CTS (arXiv 2502.04959) against MERGING.md's formulas, computed here in float64 with torch.linalg.svd.

Iso-C, per matrix: SVD of sum_i tau_i with every singular value replaced by their mean. Iso-CTS: the top k_c
directions of the sum, plus each task's top s directions off that subspace, both stacks made orthogonal, the same
flat spectrum. Other tensors: the mean tau_i.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from timelit.merging import merge, validate
from timelit.merging.iso import subspace_sizes

CONFIGS = Path(__file__).parents[3] / "configs" / "protocols"


def matrix(key: str, shape: torch.Size) -> bool:
    return len(shape) == 2 and min(shape) >= 2 and "embedding" not in key


def polar(stack: torch.Tensor) -> torch.Tensor:
    left, _, right = torch.linalg.svd(stack, full_matrices=False)
    return left @ right


def iso_matrix(kept: list[torch.Tensor], common_fraction: float | None) -> torch.Tensor:
    """Iso-C (common_fraction None) or Iso-CTS of one matrix, from the definitions."""
    u, s, vh = torch.linalg.svd(sum(kept), full_matrices=False)
    if common_fraction is None:
        return s.mean() * u @ vh
    r, n = len(s), len(kept)
    common = int(common_fraction * r)
    per_task = min(round((r - common) / n), r // n)
    common = r - n * per_task
    lefts, values, rights = [u[:, :common]], [s[:common]], [vh[:common].T]
    for tau in kept:
        off = tau - u[:, :common] @ u[:, :common].T @ tau
        u_i, s_i, vh_i = torch.linalg.svd(off, full_matrices=False)
        lefts.append(u_i[:, :per_task])
        values.append(s_i[:per_task])
        rights.append(vh_i[:per_task].T)
    return torch.cat(values).mean() * polar(torch.cat(lefts, dim=1)) @ polar(torch.cat(rights, dim=1)).T


def iso(base: dict, experts: list[dict], common_fraction: float | None = None, lam: float = 1.0) -> dict:
    out = {}
    for key, theta_0 in base.items():
        kept = [(expert[key] - theta_0).double() for expert in experts if not torch.equal(expert[key], theta_0)]
        if not kept:
            tau = torch.zeros_like(theta_0, dtype=torch.float64)
        elif matrix(key, theta_0.shape):
            tau = iso_matrix(kept, common_fraction)
        else:
            tau = sum(kept) / len(kept)
        out[key] = (theta_0.double() + lam * tau).float()
    return out


@pytest.mark.parametrize("n", [2, 3, 8])
def test_iso_c_is_its_formula(close, clip_base, perturbed, n):
    experts = perturbed(clip_base, n)
    close(merge(clip_base, experts, "iso_c"), iso(clip_base, experts))
    close(merge(clip_base, experts, "iso_c", lam=1.5), iso(clip_base, experts, lam=1.5))


@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
def test_iso_cts_is_its_formula(close, clip_base, perturbed, n, fraction):
    """Gaussian-noise task matrices have nearly equal singular values where each task's share is cut, so which
    directions a float32 SVD keeps differs from float64's by ~eps / gap (spectral.py): 4e-6 at most here."""
    experts = perturbed(clip_base, n)
    merged = merge(clip_base, experts, "iso_cts", common_space_fraction=fraction)
    close(merged, iso(clip_base, experts, fraction), atol=1e-5)


def test_iso_c_flattens_the_spectrum_of_the_task_sum(perturbed):
    base = {"w": torch.randn(30, 20, generator=torch.Generator().manual_seed(0))}
    experts = perturbed(base, 4)
    total = sum(expert["w"] - base["w"] for expert in experts)
    merged = merge(base, experts, "iso_c")["w"] - base["w"]
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, torch.full((20,), float(torch.linalg.svdvals(total).mean())), rtol=1e-5, atol=0)
    # The directions are the sum's: projecting the merge on the sum's singular vectors gives a diagonal.
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    core = u.T @ merged @ vh.T
    torch.testing.assert_close(core, torch.diag(torch.diagonal(core)), rtol=0, atol=1e-5)


def test_iso_cts_keeps_the_rank_and_a_flat_spectrum(perturbed):
    base = {"w": torch.randn(30, 20, generator=torch.Generator().manual_seed(0))}
    experts = perturbed(base, 3)
    merged = merge(base, experts, "iso_cts")["w"] - base["w"]
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, values.mean().expand(20), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("rank", "n", "fraction", "sizes"),
    [
        (16, 3, 0.8, (13, 1)),  # k_c = floor(12.8) = 12, s = round(4 / 3) = 1; the remainder joins the common space
        (768, 20, 0.8, (608, 8)),  # ViT-B/16's width: floor(614.4) = 614, s = round(7.7) = 8, k_c = 768 - 160
        (14, 4, 0.3, (6, 2)),  # s = round(10 / 4 = 2.5) = 2: Python's round, half to even, as the authors' code
        (5, 6, 0.0, (5, 0)),  # round(5 / 6) = 1 but 6 tasks cannot share 5 directions: s = 0, which is Iso-C
    ],
)
def test_subspace_sizes_follow_the_authors_rounding(rank, n, fraction, sizes):
    assert subspace_sizes(rank, n, fraction) == sizes


def test_iso_cts_without_task_specific_space_is_iso_c(clip_base, perturbed):
    experts = perturbed(clip_base, 3)
    full = merge(clip_base, experts, "iso_cts", common_space_fraction=1.0)
    iso_c = merge(clip_base, experts, "iso_c")
    assert all(torch.equal(full[key], iso_c[key]) for key in clip_base)


def test_zero_task_vectors_are_dropped(clip_base, perturbed):
    experts = perturbed(clip_base, 2)
    for method in ("iso_c", "iso_cts"):
        with_base = merge(clip_base, [experts[0], clip_base, experts[1]], method)
        without = merge(clip_base, experts, method)
        assert all(torch.equal(with_base[key], without[key]) for key in clip_base)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_the_offline_merge_configs_name_their_technique(method):
    protocol = yaml.safe_load((CONFIGS / f"offline_merge_{method}.yaml").read_text())["protocol"]
    assert (protocol["init"], protocol["deploy"], protocol["technique"]) == ("zs", "all", method)
    validate(method, protocol.get("hparams"))


def test_iso_hyperparameters_are_checked():
    with pytest.raises(ValueError, match=r"common_space_fraction=1.5 is outside \[0.0, 1.0\]"):
        validate("iso_cts", {"common_space_fraction": 1.5})
    with pytest.raises(
        ValueError, match=r"'common_space_fraction' for 'iso_c' \(Iso-C has no task-specific .* iso_cts's\)"
    ):
        validate("iso_c", {"common_space_fraction": 0.5})
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'scaling_factor' .* is `lam`"):
        validate("iso_c", {"scaling_factor": 1.0})
