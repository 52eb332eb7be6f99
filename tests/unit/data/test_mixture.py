"""Batch composition: the pipeline's rounding, equal per-rank batches, seeded endless sequences."""

from __future__ import annotations

import numpy as np
import pytest

from timelit.data.mixture import Mixture, SourceSequence, pool_offsets, rank_slices, source_counts


def test_reference_batch_of_512_splits_169_175_168():
    assert source_counts(512, Mixture(), first_task=False) == {"pretraining": 169, "current": 175, "replay": 168}


def test_first_task_gives_its_replay_share_to_current_and_pool():
    # FIF_REFERENCE.md §3: task 0 has no buffer; its 168 go 84/84 -> update 259, pretraining 253.
    assert source_counts(512, Mixture(), first_task=True) == {"pretraining": 253, "current": 259, "replay": 0}


def test_without_pool_the_first_task_is_all_current_data():
    counts = source_counts(128, Mixture(pretraining=0.0, current=0.5, replay=0.5), first_task=True)
    assert counts == {"pretraining": 0, "current": 128, "replay": 0}


def test_no_replay_mixture_keeps_zero_replay():
    assert source_counts(100, Mixture(pretraining=0.0, current=1.0, replay=0.0), first_task=False)["replay"] == 0


@pytest.mark.parametrize("shares", [(0.5, 0.6, 0.0), (-0.1, 1.0, 0.1), (0.5, 0.0, 0.5)])
def test_invalid_mixtures_are_rejected(shares):
    with pytest.raises(ValueError):
        Mixture(*shares)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_rank_slices_tile_the_global_batch_with_equal_sizes(world):
    counts = {"pretraining": 169, "current": 175, "replay": 168}
    slices = [rank_slices(counts, world, r) for r in range(world)]
    assert {sum(count for _, count in s.values()) for s in slices} == {512 // world}
    for source, total in counts.items():
        covered = [i for s in slices for i in range(s[source][0], s[source][0] + s[source][1])]
        assert sorted(covered) == list(range(total))  # every position exactly once


def test_rank_slices_refuse_an_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible"):
        rank_slices({"pretraining": 1, "current": 2, "replay": 0}, 2, 0)


def test_sequence_visits_every_candidate_once_per_pass_and_is_seeded():
    candidates = np.arange(10, 20)
    sequence = SourceSequence(candidates, seed=3, task=1, source="current")
    first_pass, second_pass = sequence.take(0, 10), sequence.take(10, 10)
    assert sorted(first_pass) == list(range(10, 20)) and sorted(second_pass) == list(range(10, 20))
    assert not np.array_equal(first_pass, second_pass)
    again = SourceSequence(candidates, seed=3, task=1, source="current")
    assert np.array_equal(again.take(7, 9), sequence.take(7, 9))  # a window across the pass boundary
    other_seed = SourceSequence(candidates, seed=4, task=1, source="current")
    assert not np.array_equal(other_seed.take(0, 10), first_pass)


def test_empty_source_is_an_error_naming_it():
    with pytest.raises(ValueError, match="replay source of task 2"):
        SourceSequence(np.empty(0, dtype=np.int64), seed=0, task=2, source="replay")


def test_pool_runs_on_across_tasks():
    assert pool_offsets([253, 169, 169], steps_per_task=10) == [0, 2530, 4220]
