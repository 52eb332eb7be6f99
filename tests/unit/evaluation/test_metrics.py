"""The A_KA / A_ZS / GM aggregation of FoMo-in-Flux on hand-written per-dataset figures.

python -m pytest tests/unit/evaluation/test_metrics.py -q
"""

from __future__ import annotations

import math

import pytest

from timelit.training.evaluation.metrics import summarize


def classification(role: str, top1: float, n: int, full_top1: float | None = None) -> dict:
    entry = {"role": role, "task": "classification", "subset": {"top1": top1, "n": n}}
    if full_top1 is not None:
        entry["full"] = {"top1": full_top1, "n": 10 * n}
    return entry


def retrieval(role: str, i2t: float, t2i: float, n: int) -> dict:
    return {
        "role": role,
        "task": "retrieval",
        "subset": {"i2t_R@1": 1.0, "t2i_R@1": 2.0, "i2t_R@5": i2t, "t2i_R@5": t2i, "R@5": (i2t + t2i) / 2, "n": n},
    }


DATASETS = {
    "ADAPT_CLS": classification("adapt", 40.0, n=300, full_top1=35.0),
    "ADAPT_RET": retrieval("adapt", 60.0, 80.0, n=500),  # contributes its mean R@5, 70
    "HELD_CLS_1": classification("eval", 90.0, n=1000, full_top1=85.0),
    "HELD_CLS_2": classification("eval", 60.0, n=20, full_top1=55.0),
}


def test_plain_means_per_role_and_their_geometric_mean():
    summary = summarize(DATASETS)
    # Datasets weigh equally whatever their size: (40 + 70) / 2 and (90 + 60) / 2.
    assert summary["A_KA"] == pytest.approx(55.0)
    assert summary["A_ZS"] == pytest.approx(75.0)
    assert summary["GM"] == pytest.approx(math.sqrt(55.0 * 75.0))


def test_equals_the_reference_pipeline_formula():
    """results_from_wandb_xid.py: KA = (n_cls * mean accuracy + R@5 of the retrieval set) / (n_cls + 1)."""
    adapt = {f"C{i}": classification("adapt", acc, n=300) for i, acc in enumerate((12.0, 47.0, 81.0))}
    adapt["FSCOCO"] = retrieval("adapt", 30.0, 50.0, n=300)
    held = {"IMAGENET": classification("eval", 64.0, n=300), "MSCOCO": retrieval("eval", 70.0, 74.0, n=5000)}
    summary = summarize(adapt | held)
    assert summary["A_KA"] == pytest.approx((3 * (12.0 + 47.0 + 81.0) / 3 + 40.0) / 4)
    assert summary["A_ZS"] == pytest.approx((64.0 + 72.0) / 2)


def test_full_scope_reads_full_figures_of_the_datasets_that_have_them():
    summary = summarize(DATASETS, "full")
    assert summary["A_KA"] == pytest.approx(35.0)  # the retrieval set has no full figures here
    assert summary["A_ZS"] == pytest.approx(70.0)
    assert summary["GM"] == pytest.approx(math.sqrt(35.0 * 70.0))


def test_without_adaptation_datasets_a_ka_and_gm_are_nan():
    summary = summarize({name: e for name, e in DATASETS.items() if e["role"] != "adapt"})
    assert math.isnan(summary["A_KA"]) and math.isnan(summary["GM"])
    assert summary["A_ZS"] == pytest.approx(75.0)


def test_without_held_out_datasets_only_a_ka_is_reported():
    # a stream of one's own data with no held-out set beside it: no zero-shot retention to measure, no NaN GM
    assert summarize({name: e for name, e in DATASETS.items() if e["role"] != "eval"}) == pytest.approx({"A_KA": 55.0})


def test_nothing_to_summarize_is_all_nan():
    assert all(math.isnan(v) for v in summarize({}).values())
