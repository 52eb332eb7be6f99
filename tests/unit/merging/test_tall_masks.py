"""TALL masks' consensus (arXiv 2405.07813) over task arithmetic and over TIES, against MERGING.md's formulas.

mask_i = |tau_i| > mask_lambda |tau_s - tau_i| with tau_s = sum_i tau_i; consensus = (sum_i mask_i >= min_agree);
tall_masks: theta = theta_0 + lam tau_s consensus; consensus_ties: theta = theta_0 + lam tau_TIES consensus.
"""

from __future__ import annotations

import pytest
import torch

from timelit.merging import merge, validate


def consensus(base: dict, experts: list[dict], key: str, mask_lambda: float, min_agree: int) -> torch.Tensor:
    """The consensus mask of one tensor, from the definition (task vectors in float32, the rest in float64)."""
    taus = torch.stack([(expert[key] - base[key]).double() for expert in experts])
    total = taus.sum(0)
    masks = taus.abs() > mask_lambda * (total - taus).abs()
    return masks.sum(0) >= min_agree


def tall_masks(base: dict, experts: list[dict], mask_lambda: float, min_agree: int, lam: float) -> dict:
    out = {}
    for key, theta_0 in base.items():
        total = sum((expert[key] - theta_0).double() for expert in experts)
        keep = consensus(base, experts, key, mask_lambda, min_agree)
        out[key] = (theta_0.double() + lam * total * keep).float()
    return out


def _close(a: dict, b: dict) -> None:
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


BASE = {"w": torch.zeros(4)}
# tau_s = [3, 1, 4, 1]. Entry 0: every |tau_i| = 1 > 0.4 * 2 (3 claims). Entry 1: only tau_1 (1 > 0); entry 2: only
# tau_3 (4 > 0); zeros never claim. Entry 3: 2 > 0.4 * 1, 2 > 0.4 * 3 and 1 > 0 (3 claims).
TAUS = [[1.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, -2.0], [1.0, 0.0, 4.0, 1.0]]
EXPERTS = [{"w": torch.tensor(tau)} for tau in TAUS]


@pytest.mark.parametrize(
    ("min_agree", "expected"),
    [(0, [3.0, 1.0, 4.0, 1.0]), (1, [3.0, 1.0, 4.0, 1.0]), (2, [3.0, 0.0, 0.0, 1.0]), (3, [3.0, 0.0, 0.0, 1.0])],
)
def test_consensus_on_hand_made_task_vectors(min_agree, expected):
    assert merge(BASE, EXPERTS, "tall_masks", min_agree=min_agree)["w"].tolist() == expected


@pytest.mark.parametrize("min_agree", [1, 2, 3])
@pytest.mark.parametrize("mask_lambda", [0.2, 0.4, 1.0])
def test_tall_masks_is_its_formula(clip_base, perturbed, min_agree, mask_lambda):
    experts = perturbed(clip_base, 4)
    out = merge(clip_base, experts, "tall_masks", mask_lambda=mask_lambda, min_agree=min_agree, lam=0.5)
    _close(out, tall_masks(clip_base, experts, mask_lambda, min_agree, lam=0.5))
    kept = sum(int(consensus(clip_base, experts, key, mask_lambda, min_agree).sum()) for key in clip_base)
    total = sum(value.numel() for value in clip_base.values())
    assert 0 < kept < total or (min_agree == 1 and kept == total)  # the consensus selects (one claim is common)


def test_min_agree_zero_is_task_arithmetic(clip_base, perturbed):
    experts = perturbed(clip_base, 3)
    tall = merge(clip_base, experts, "tall_masks", min_agree=0, lam=0.3)
    arithmetic = merge(clip_base, experts, "task_arithmetic", lam=0.3)
    assert all(torch.equal(tall[key], arithmetic[key]) for key in clip_base)


@pytest.mark.parametrize("min_agree", [1, 2])
def test_consensus_ties_masks_the_ties_vector(clip_base, perturbed, min_agree):
    experts = perturbed(clip_base, 3)
    out = merge(clip_base, experts, "consensus_ties", k=0.3, min_agree=min_agree, scope="tower")
    ties = merge(clip_base, experts, "ties", k=0.3, scope="tower")
    for key, theta_0 in clip_base.items():
        keep = consensus(clip_base, experts, key, 0.4, min_agree)
        assert torch.equal(out[key][~keep], theta_0[~keep])  # outside the consensus: theta_0 exactly
        assert torch.equal(out[key][keep], ties[key][keep])  # inside: TIES, bit for bit
    if min_agree == 2:  # entries claimed by one expert only are common and TIES often keeps them
        assert not all(torch.equal(out[key], ties[key]) for key in clip_base)


def test_consensus_ties_with_min_agree_zero_is_ties(clip_base, perturbed):
    experts = perturbed(clip_base, 3)
    consensus_ties = merge(clip_base, experts, "consensus_ties", k=0.3, min_agree=0)
    ties = merge(clip_base, experts, "ties", k=0.3)
    assert all(torch.equal(consensus_ties[key], ties[key]) for key in clip_base)


def test_an_entry_whose_ties_signs_cancel_takes_the_majority_only_inside_the_consensus():
    # k = 1 keeps everything. Entry 1 sums to 0: TIES gives it the majority sign (+, from entries 0 and 2), so the
    # mean of its positive entries, 2. Only tau_1 and tau_2 claim it (2 > 0.4 * 2; 0 claims nothing).
    experts = [{"w": torch.tensor(tau)} for tau in ([1.0, -2.0, 1.0], [1.0, 2.0, 1.0], [1.0, 0.0, 1.0])]
    base = {"w": torch.zeros(3)}
    assert merge(base, experts, "ties", k=1.0)["w"].tolist() == [1.0, 2.0, 1.0]
    assert merge(base, experts, "consensus_ties", k=1.0, min_agree=2)["w"].tolist() == [1.0, 2.0, 1.0]
    assert merge(base, experts, "consensus_ties", k=1.0, min_agree=3)["w"].tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("method", ["tall_masks", "consensus_ties"])
def test_bad_consensus_settings_are_rejected(method):
    for hparams, message in (
        ({"min_agree": -1}, "min_agree must be a non-negative number of experts, got -1"),
        ({"min_agree": 1.5}, "min_agree must be a non-negative number of experts"),
        ({"min_agree": True}, "min_agree must be a non-negative number of experts"),
        ({"mask_lambda": -0.1}, r"mask_lambda=-0.1 is outside \[0.0, inf\]"),
        ({"tall_mask_lambda": 0.4}, "the TALL mask's lambda is `mask_lambda`"),
    ):
        with pytest.raises(ValueError, match=message):
            validate(method, hparams)
    with pytest.raises(
        ValueError, match=rf"{method} with min_agree=3 needs at least 3 experts to keep anything, got 2"
    ):
        merge(BASE, EXPERTS[:2], method, min_agree=3)


def test_tall_masks_takes_no_scope_and_consensus_ties_does():
    with pytest.raises(ValueError, match="scope='tower' has no effect on tall_masks"):
        validate("tall_masks", {"scope": "tower"})
    assert validate("consensus_ties", {"scope": "tower"}).scope == "tower"
