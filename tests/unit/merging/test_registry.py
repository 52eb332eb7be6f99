"""The one registry: method names, hyperparameter names and values fail early, with the valid choices."""

from __future__ import annotations

import typing

import pytest
import torch

from timelit.merging import TECHNIQUES, MergeMethod, merge, validate
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
        ("breadcrumbs", "beta", "`top_drop` .* MERGING.md's beta"),
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
