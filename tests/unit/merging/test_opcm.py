"""OPCM (arXiv 2501.09522) against MERGING.md's description, computed here in float64 with a full torch.linalg.svd.

Each new tau_t is projected away from the merged vector's singular directions (per matrix: P = U^T tau_t V loses its
diagonal and its top r x r block, r from alpha's share of the singular value sum) and added to lambda_{t-1} tau_m;
lambda_t rescales the sum to the mean task vector norm. State: lambda, the norm sum and the count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from timelit.merging import load_weights, merge, merge_step, read_metadata, save_weights, validate
from timelit.merging.opcm import OpcmState

CONFIG = Path(__file__).parents[3] / "configs" / "protocols" / "ema_ema_opcm.yaml"


def matrix(key: str, shape: torch.Size) -> bool:
    return len(shape) == 2 and min(shape) >= 2 and "embedding" not in key


def projected(tau: torch.Tensor, merged: torch.Tensor, alpha: float) -> torch.Tensor:
    """tau in the merged vector's full singular bases, with the used coordinates zeroed, mapped back."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    coordinates = u.T @ tau @ vh.T
    rank = int((s > s[0] * max(merged.shape) * torch.finfo(torch.float32).eps).sum())
    top = int((torch.cumsum(s, 0) / s.sum() <= alpha).sum())
    for i in range(rank):
        coordinates[i, i] = 0.0
    coordinates[:top, :top] = 0.0
    return u @ coordinates @ vh


def opcm(base: dict, experts: list[dict], alpha: float = 0.5) -> dict:
    """The definition in float64, expert by expert; zero task vectors skipped."""
    tau_m, scale, norms = None, 1.0, []
    for expert in experts:
        taus = {key: (expert[key] - value).double() for key, value in base.items()}  # tau in float32, as specified
        norm = math.sqrt(sum(float((tau**2).sum()) for tau in taus.values()))
        if norm == 0:
            continue
        norms.append(norm)
        if tau_m is None:
            tau_m = taus
            continue
        for key, tau in taus.items():
            if matrix(key, tau.shape):
                taus[key] = projected(tau, tau_m[key], alpha)
        summed = {key: scale * tau_m[key] + taus[key] for key in base}
        size = math.sqrt(sum(float((value**2).sum()) for value in summed.values()))
        mean = sum(norms) / len(norms)
        tau_m, scale = {key: value * mean / size for key, value in summed.items()}, size / mean
    if tau_m is None:
        return {key: value.clone() for key, value in base.items()}
    return {key: (value.double() + tau_m[key]).float() for key, value in base.items()}


def equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("alpha", [0.5, 0.0, 0.9])
def test_opcm_is_its_formula(close, clip_base, perturbed, n, alpha):
    experts = perturbed(clip_base, n)
    close(merge(clip_base, experts, "opcm", alpha=alpha), opcm(clip_base, experts, alpha))


def test_the_projection_and_the_scale_on_a_hand_made_example():
    """tau_m = diag(3, 2, 1, 0): singular values 3, 2, 1 (rank 3); alpha 0.5 protects the top r = 1 direction
    (3 / 6 <= 0.5 < 5 / 6). tau_2 = all ones loses P_00 (the block) and P_11, P_22 (the used diagonal); P_33 lies on
    the null direction and stays. U_2 = tau_m + that: diagonal (3, 2, 1, 1), off-diagonal ones, ||U_2||^2 = 27;
    the mean norm is (sqrt(14) + 4) / 2, so theta = U_2 (sqrt(14) + 4) / (2 sqrt(27)), lambda_2 = 2 sqrt(27) /
    (sqrt(14) + 4)."""
    base = {"w": torch.zeros(4, 4)}
    first, second = {"w": torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))}, {"w": torch.ones(4, 4)}
    merged, state = merge_step(base, None, first, "opcm")
    assert torch.equal(merged["w"], first["w"]) and state == {"scale": 1.0, "norm_sum": math.sqrt(14), "count": 1}
    merged, state = merge_step(base, merged, second, "opcm", state)
    summed = torch.ones(4, 4) + torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0]))
    mean = (math.sqrt(14) + 4) / 2
    torch.testing.assert_close(merged["w"], summed * (mean / math.sqrt(27)))
    assert state["count"] == 2 and state["norm_sum"] == pytest.approx(math.sqrt(14) + 4)
    assert state["scale"] == pytest.approx(math.sqrt(27) / mean)


def test_the_merged_vector_keeps_the_mean_task_vector_norm(clip_base, perturbed):
    experts = perturbed(clip_base, 4)
    norms = [math.sqrt(sum(float(((e[k] - v).double() ** 2).sum()) for k, v in clip_base.items())) for e in experts]
    merged, state = None, None
    for t, expert in enumerate(experts, start=1):
        merged, state = merge_step(clip_base, merged, expert, "opcm", state)
        size = math.sqrt(sum(float(((merged[k] - v).double() ** 2).sum()) for k, v in clip_base.items()))
        assert size == pytest.approx(sum(norms[:t]) / t, rel=1e-5)
    # Nearly orthogonal task vectors: lambda grows like sqrt(t), the paper's empirical rate.
    assert state["scale"] == pytest.approx(2.0, rel=0.05)


def test_carrying_the_state_through_files_equals_the_fold_bitwise(clip_base, perturbed, tmp_path):
    """A TIME run folds each new expert into the previous task's merged file with the state from its checkpoint:
    the same bits as merging all experts at once, whatever was reloaded in between."""
    experts = perturbed(clip_base, 4)
    previous, state = None, None
    for t, expert in enumerate(experts):
        merged, state = merge_step(clip_base, previous, expert, "opcm", state, alpha=0.3)
        previous = tmp_path / f"ema_{t}.safetensors"
        save_weights(previous, merged, {"timelit.merge_state": json.dumps(state)})
        state = json.loads(read_metadata(previous)["timelit.merge_state"])  # as a resumed run would read it
        assert equal(load_weights(previous), merge(clip_base, experts[: t + 1], "opcm", alpha=0.3))
    assert OpcmState.from_dict(state).count == 4


def test_an_expert_equal_to_theta_0_is_skipped(clip_base, perturbed):
    first, second = perturbed(clip_base, 2)
    assert equal(
        merge(clip_base, [clip_base, first, clip_base, second], "opcm"), merge(clip_base, [first, second], "opcm")
    )
    assert equal(merge(clip_base, [clip_base, first], "opcm"), first)  # from theta_0 or from theta_1: the same
    assert equal(merge(clip_base, [clip_base], "opcm"), clip_base)


def test_ema_and_all_with_opcm_are_the_running_merge(clip_base, perturbed):
    protocol = yaml.safe_load(CONFIG.read_text())["protocol"]
    assert (protocol["init"], protocol["deploy"], protocol["technique"]) == ("ema", "ema", "opcm")
    assert validate("opcm", protocol.get("hparams")).alpha == 0.5


def test_bad_states_and_settings_are_explained(clip_base, perturbed):
    (expert,) = perturbed(clip_base, 1)
    with pytest.raises(
        ValueError, match=r"tsv merges all experts at once; merge_step needs a sequential technique \(opcm\)"
    ):
        merge_step(clip_base, None, expert, "tsv")
    with pytest.raises(ValueError, match="an OPCM state was given without the merged weights"):
        merge_step(clip_base, None, expert, "opcm", {"scale": 1.0, "norm_sum": 1.0, "count": 1})
    with pytest.raises(ValueError, match=r"not an OPCM state \(scale, norm_sum, count\)"):
        merge_step(clip_base, clip_base, expert, "opcm", {"lambda": 1.0})
    with pytest.raises(ValueError, match="not a valid OPCM state"):
        merge_step(clip_base, clip_base, expert, "opcm", {"scale": 1.0, "norm_sum": 1.0, "count": 0})
    with pytest.raises(ValueError, match=r"alpha=1.0 is outside \[0.0, 1.0\)"):
        validate("opcm", {"alpha": 1.0})
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'lam' for 'opcm' \(OPCM scales by its own"):
        validate("opcm", {"lam": 1.0})
    with pytest.raises(ValueError, match=r"'shuffle_order' for 'opcm' \(timelit merges experts in store"):
        validate("opcm", {"shuffle_order": True})
