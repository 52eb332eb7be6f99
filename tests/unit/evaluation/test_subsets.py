"""The fixed evaluation subsets: n = min(N, max(2C, 300, int(0.1 N))), per-class minimum, drawn once from a seed.

python -m pytest tests/unit/evaluation/test_subsets.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from timelit.training.evaluation.subsets import SubsetRule


@pytest.mark.parametrize(
    ("num_samples", "num_classes", "expected"),
    [
        (1000, 10, 300),  # the 300 floor
        (5000, 10, 500),  # 10%
        (3333, 10, 333),  # int(333.3)
        (200, 10, 200),  # smaller than the floor: everything
        (1000, 400, 800),  # two per class
        (10_000, 1000, 2000),
        (50, 100, 50),  # never more than N
    ],
)
def test_size_follows_the_reference_rule(num_samples, num_classes, expected):
    assert SubsetRule().size(num_samples, num_classes) == expected


def balanced(num_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def test_select_draws_n_distinct_sorted_positions_with_the_per_class_minimum():
    labels = np.random.default_rng(0).permutation(balanced(10, 400))  # N = 4000 -> n = 400, 40 per class
    subset = SubsetRule(seed=7).select(labels, 10)
    assert len(subset) == 400 and len(np.unique(subset)) == 400
    assert np.all(np.diff(subset) > 0) and subset.min() >= 0 and subset.max() < len(labels)
    assert np.bincount(labels[subset], minlength=10).min() >= 40


def test_a_class_smaller_than_its_share_gives_all_it_has_and_the_rest_is_filled():
    labels = np.concatenate([balanced(9, 400), np.full(3, 9)])  # class 9 has 3 samples, its share is 33
    subset = SubsetRule().select(labels, 10)
    assert len(subset) == SubsetRule().size(len(labels), 10)
    assert np.sum(labels[subset] == 9) == 3


def test_same_seed_same_subset_other_seed_other_subset():
    labels = balanced(5, 1000)
    first, again = SubsetRule(seed=3).select(labels, 5), SubsetRule(seed=3).select(labels, 5)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, SubsetRule(seed=4).select(labels, 5))


def test_retrieval_without_classes_evaluates_in_full():
    """MSCOCO and Flickr30k: every image is its own class, so 2C > N and the subset is the whole split."""
    labels = np.full(5000, -1)
    np.testing.assert_array_equal(SubsetRule().select(labels, None), np.arange(5000))


def test_configured_rule():
    rule = SubsetRule(fraction=0.5, minimum=5, per_class=1)
    assert rule.size(15, 5) == 7
    assert len(rule.select(balanced(5, 3), 5)) == 7
