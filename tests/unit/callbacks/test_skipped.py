"""Skip accounting (issue 20, item 5) without a Trainer: the reader lists what it skipped and why, the ledger counts
distinct samples per dataset split and shard, and the callback warns once per damaged sample or shard and stops a
run past its limit."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from timelit.data.loaders import SampleReader, encode
from timelit.data.shards import ShardIndex
from timelit.data.skips import Skip, SkipLedger
from timelit.training.callbacks.skipped import SkippedSamples, TooManySkipped


@pytest.fixture
def damaged(tiny_benchmark, tmp_path, damage_sample) -> Path:
    """DIGITS/train with samples 1 and 3 damaged; SHAPES/test empty."""
    root = tmp_path / "bench"
    for name in ("DIGITS", "SHAPES"):
        shutil.copytree(tiny_benchmark / name, root / name)
    index = ShardIndex.load(root / "DIGITS", "train")
    for position in (1, 3):
        damage_sample(index, position)
    (root / "SHAPES" / "test-000000.tar").write_bytes(b"")
    return root


def test_the_reader_lists_each_skipped_sample_with_its_shard_and_what_happened_to_it(damaged):
    digits, shapes = ShardIndex.load(damaged / "DIGITS", "train"), ShardIndex.load(damaged / "SHAPES", "test")
    reader = SampleReader([digits, shapes], on_corrupt="skip")
    read = [reader.read(int(i)) for i in encode(0, np.arange(5))] + [reader.read(int(encode(1, np.array([2]))[0]))]
    assert [sample is None for sample in read] == [False, True, False, True, False, True]
    skipped = reader.take_skipped()
    assert [(s.dataset, s.split, s.shard, s.position) for s in skipped] == [
        ("DIGITS", "train", "train-000000.tar", 1),
        ("DIGITS", "train", "train-000000.tar", 3),
        ("SHAPES", "test", "test-000000.tar", 2),
    ]
    assert "image does not decode" in skipped[0].reason and skipped[0].shard_problem is None
    assert skipped[2].shard_problem.startswith(f"shard {damaged / 'SHAPES' / 'test-000000.tar'} is empty")
    assert reader.take_skipped() == []  # taken: the next batch lists its own


def skip(dataset: str, position: int, shard: str = "train-000000.tar", problem: str | None = None) -> Skip:
    return Skip(dataset, "train", shard, position, f"sample {position} does not decode", problem)


def test_the_ledger_counts_distinct_samples_per_split_and_shard_and_pools_ranks():
    ledger = SkipLedger()
    assert [ledger.add(s) for s in (skip("A", 1), skip("A", 1), skip("A", 2, "train-000001.tar"))] == [
        True,
        False,
        True,
    ]
    other_rank = SkipLedger()
    other_rank.add(skip("A", 2, "train-000001.tar"))
    other_rank.add(skip("B", 7))
    ledger.merge([other_rank.state_dict()])
    assert ledger.counts() == {"A/train": 2, "B/train": 1} and len(ledger) == 3
    assert ledger.to_dict()["A/train"] == {"samples": 2, "shards": {"train-000000.tar": 1, "train-000001.tar": 1}}
    assert (
        ledger.summary() == "3 sample(s): A/train 2 (train-000000.tar, train-000001.tar), B/train 1 (train-000000.tar)"
    )
    restored = SkipLedger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.to_dict() == ledger.to_dict()


def test_the_callback_warns_once_per_sample_and_once_per_damaged_shard(caplog):
    callback, trainer = SkippedSamples(), SimpleNamespace(world_size=1, is_global_zero=True, loggers=[], global_step=0)
    empty = "shard x/SHAPES/test-000000.tar is empty (its index places 9 samples in 9216 bytes)"
    batches = [
        [skip("A", 1), Skip("SHAPES", "test", "test-000000.tar", 0, "ends early", empty)],
        [skip("A", 1), Skip("SHAPES", "test", "test-000000.tar", 1, "ends early", empty), skip("A", 4)],
    ]
    with caplog.at_level(logging.WARNING, logger="timelit"):
        for batch in batches:
            callback.on_train_batch_end(trainer, None, None, {"skipped": batch}, 0)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "skipping a sample that does not decode: sample 1 does not decode",
        f"{empty}: the samples it lost are skipped",
        "skipping a sample that does not decode: sample 4 does not decode",
    ]
    assert callback.ledger.counts() == {"A/train": 2, "SHAPES/test": 2}
    assert callback.task_record(trainer) == {"skipped": {"A/train": 2, "SHAPES/test": 2}}


def test_a_run_stops_once_more_samples_than_the_limit_were_skipped():
    callback, trainer = SkippedSamples(limit=2), SimpleNamespace(world_size=1)
    callback._record(trainer, [skip("A", 1), skip("A", 2), skip("A", 2)])  # two distinct: at the limit
    with pytest.raises(TooManySkipped, match=r"^3 samples were skipped as undecodable, more than skipped.limit 2: "):
        callback._record(trainer, [skip("B", 5)])
    with pytest.raises(ValueError, match=r"skipped\.limit"):
        SkippedSamples(limit=-1)
