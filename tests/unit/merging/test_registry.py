"""The one registry: method names, hyperparameter names and values fail early, with the valid choices."""

from __future__ import annotations

import json
import typing

import pytest
import torch

from timelit.merging import TECHNIQUES, MergeMethod, merge, validate
from timelit.merging.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from timelit.merging.ties import Ties


def test_the_typed_method_names_are_the_registry():
    assert list(typing.get_args(MergeMethod)) == list(TECHNIQUES)


def test_an_unknown_method_lists_the_valid_ones_and_suggests_the_nearest():
    with pytest.raises(
        ValueError, match=r"unknown merge method 'tie'; did you mean 'ties'\?; valid: average, .*, lines"
    ):
        validate("tie")


def test_an_unknown_hyperparameter_lists_the_valid_ones_and_suggests_the_nearest():
    with pytest.raises(ValueError, match=r"'lamda' for 'ties'; did you mean 'lam'\?; valid: skip, lam, scope, .*, k"):
        validate("ties", {"lamda": 0.5})


@pytest.mark.parametrize(
    ("method", "name", "explanation"),
    [
        ("ties", "prune_percentile", "k = 1 - prune_percentile"),
        ("breadcrumbs", "top_prune_percentile", "is `top_drop`"),
        ("slerp", "weight_coefficients", r"`t` \(the newer model's weight\) = 1 - weight_coefficients\[0\]"),
        ("dare", "density", "p = 1 - density"),
        ("interpolation", "weight_coefficients", "is w=w_new"),
    ],
)
def test_names_from_the_pipeline_and_mergekit_are_translated(method, name, explanation):
    with pytest.raises(ValueError, match=explanation):
        validate(method, {name: 0.5})


@pytest.mark.parametrize(
    ("method", "hparams", "message"),
    [
        ("ties", {"k": 1.5}, r"k=1.5 is outside \[0.0, 1.0\]"),
        (
            "ties",
            {"scope": "towers"},
            r"scope='towers' is not valid; choose one of model, tower, tensor. Did you mean 'tower'",
        ),
        ("dare", {"p": 1.0}, r"p=1.0 is outside \[0.0, 1.0\)"),
        ("dare", {"seed": 1.5}, "seed must be an integer"),
        ("breadcrumbs", {"top_drop": 0.5, "bottom_drop": 0.5}, "drops everything"),
        ("average", {"weights": [0.5, "x"]}, r"weights\[1\] must be a finite number"),
        ("interpolation", {"w": 2}, r"w=2 is outside"),
        ("ties", {"k": "0.3"}, "k must be a finite number"),
        ("task_arithmetic", {"lam": float("nan")}, "lam must be a finite number"),
        ("ties", {"skip": 5}, "skip must be a list of key patterns"),
        ("average", {"weights": 0.5}, "weights must be a list with one number per expert"),
        ("lines", {"alpha": "automatic"}, "alpha must be a finite number"),
        ("dare", {"scope": "tower"}, r"scope='tower' has no effect on dare: it merges entry by entry"),
        ("task_arithmetic", {"scope": "tensor", "lines": True}, "where lines_alpha='auto' is computed"),
        ("lines", {"scope": "tower", "alpha": 0.5}, "scope='tower' has no effect on lines"),
        ("tsv", {"scope": "tower"}, "scope='tower' has no effect on tsv"),
        ("iso_cts", {"common_space_fraction": -0.1}, r"common_space_fraction=-0.1 is outside \[0.0, 1.0\]"),
        ("opcm", {"alpha": -0.5}, r"alpha=-0.5 is outside \[0.0, 1.0\)"),
    ],
)
def test_bad_values_are_rejected_at_validation(method, hparams, message):
    with pytest.raises(ValueError, match=message):
        validate(method, hparams)


def test_validate_returns_a_technique_that_merge_accepts():
    technique = validate("ties", {"k": 1.0})
    assert technique == Ties(k=1.0)
    base, expert = {"w": torch.zeros(3)}, {"w": torch.tensor([1.0, -2.0, 3.0])}
    assert torch.equal(merge(base, [expert], technique)["w"], expert["w"])
    with pytest.raises(ValueError, match="either in the technique or as keywords"):
        merge(base, [expert], technique, k=0.5)


def test_hyperparameters_are_recorded_as_plain_values():
    assert validate("average", {"weights": [0.25, 0.75], "skip": ["logit_scale"]}).hparams() == {
        "skip": ["logit_scale"],
        "weights": [0.25, 0.75],
        "normalize": False,
    }


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_takes_merging_md_beta_and_gamma_for_top_drop_and_bottom_drop(method):
    technique = {"breadcrumbs": Breadcrumbs, "breadcrumbs_ties": BreadcrumbsTies}[method]
    assert validate(method, {"beta": 0.02, "gamma": 0.6}) == technique(top_drop=0.02, bottom_drop=0.6)
    assert validate(method, {"beta": 0.05, "bottom_drop": 0.5}) == technique(top_drop=0.05, bottom_drop=0.5)
    base, expert = {"w": torch.zeros(10)}, {"w": torch.arange(1.0, 11.0)}
    # beta = 0.1 drops the largest of 10 and gamma = 0.3 the three smallest, as top_drop and bottom_drop do.
    by_alias = merge(base, [expert], method, beta=0.1, gamma=0.3)["w"]
    assert by_alias.tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 9, 0]


def test_an_alias_given_with_its_field_is_an_error():
    with pytest.raises(ValueError, match=r"'beta' and 'top_drop' are two names for the same 'breadcrumbs' .* give one"):
        validate("breadcrumbs", {"beta": 0.02, "top_drop": 0.01})
    with pytest.raises(ValueError, match=r"'bottom_drop' and 'gamma' are two names .* 'bottom_drop'"):
        validate("breadcrumbs_ties", {"bottom_drop": 0.5, "gamma": 0.5})


def test_an_unknown_hyperparameter_lists_the_aliases_too():
    with pytest.raises(
        ValueError,
        match=r"'betta' for 'breadcrumbs'; did you mean 'beta'\?; valid: skip, .*, top_drop, bottom_drop, "
        r"beta \(= top_drop\), gamma \(= bottom_drop\)$",
    ):
        validate("breadcrumbs", {"betta": 0.02})


def test_provenance_records_the_fields_an_alias_set():
    recorded = validate("breadcrumbs", {"beta": 0.02, "gamma": 0.6}).hparams()
    assert (recorded["top_drop"], recorded["bottom_drop"]) == (0.02, 0.6)
    assert "beta" not in recorded and "gamma" not in recorded


@pytest.mark.parametrize(
    ("method", "hparams", "n", "resolved", "left_out"),
    [
        (
            "ties",
            {"k": 0.3},
            3,
            {"lam": 1.0, "k": 0.3, "scope": "model", "lines": False},
            {"lines_alpha", "lines_beta"},
        ),
        ("ties", {"lines": True}, 3, {"lines_alpha": 0.5, "lines_beta": 0.5}, {"lam"}),
        ("dare", {"lines": True, "lines_alpha": "auto"}, 3, {"lines_alpha": "auto", "lines_beta": 0.5}, {"lam"}),
        ("breadcrumbs_ties", {"lam": 0.3}, 2, {"lam": 0.3, "top_drop": 0.01, "bottom_drop": 0.7}, {"lines_alpha"}),
        ("average", {}, 4, {"weights": [0.25, 0.25, 0.25, 0.25], "normalize": False}, set()),
        # normalized to [0.125, 0.125, 0.75 - 2^-53], which sum to 1 - 2^-53: normalizing again would move them
        ("average", {"weights": [0.1, 0.1, 0.6], "normalize": True}, 3, {"normalize": False}, set()),
        ("slerp", {}, 2, {"t": 0.5}, set()),
        ("slerp", {}, 3, {"t": None}, set()),  # null: the fold t_j = 1/j
        ("model_stock", {}, 3, {"skip": []}, set()),
        ("tall_masks", {}, 3, {"lam": 1.0, "mask_lambda": 0.4, "min_agree": 2}, {"lines_alpha"}),
        ("consensus_ties", {"k": 0.3}, 3, {"lam": 1.0, "k": 0.3, "mask_lambda": 0.4, "min_agree": 2}, {"lines_beta"}),
        ("random", {"seed": 4}, 3, {"lam": 1.0, "seed": 4}, set()),
        ("tsv", {}, 3, {"lam": 1.0, "scope": "model", "lines": False}, {"lines_alpha", "lines_beta"}),
        ("iso_c", {"lam": 1.5}, 3, {"lam": 1.5}, {"lines_alpha"}),
        ("iso_cts", {"lines": True}, 3, {"common_space_fraction": 0.8, "lines_alpha": 0.5}, {"lam"}),
        ("opcm", {}, 3, {"alpha": 0.5, "skip": []}, set()),
    ],
)
def test_provenance_records_resolved_defaults_and_rebuilds_the_same_merge(
    clip_base, perturbed, method, hparams, n, resolved, left_out
):
    technique = validate(method, hparams)
    recorded = json.loads(json.dumps(technique.hparams(n)))  # as the merge command writes it
    assert recorded.items() >= resolved.items()
    assert left_out.isdisjoint(recorded)
    experts = perturbed(clip_base, n)
    again, original = merge(clip_base, experts, method, **recorded), merge(clip_base, experts, technique)
    assert all(torch.equal(again[key], original[key]) for key in clip_base)
