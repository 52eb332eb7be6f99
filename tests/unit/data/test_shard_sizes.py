"""Shards checked against their index at set-up (issue 20, item 6): a missing or short shard is found before
training, all of them in one error, instead of at the first task that reads it; reading a short shard says so once
per shard ("is empty", "ends at byte N of M")."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from timelit.data.datamodule import Preprocessing, TimeDataModule
from timelit.data.shard_sizes import shard_size_problems, shard_sizes
from timelit.data.shards import CorruptSampleError, ShardIndex
from timelit.training.clip import build_clip


@pytest.fixture(scope="module")
def preprocessing() -> Preprocessing:
    bundle = build_clip("timelit-micro-ViT")
    return Preprocessing(bundle.train_transform, bundle.eval_transform, bundle.tokenizer)


@pytest.fixture
def bench(tiny_benchmark, tmp_path) -> Path:
    root = tmp_path / "bench"
    shutil.copytree(tiny_benchmark, root)
    return root


def set_up(root: Path, preprocessing: Preprocessing, on_corrupt: str = "skip") -> TimeDataModule:
    dm = TimeDataModule(
        data_root=str(root), manifests=str(root), stream="random", num_tasks=3, batch_size=16,
        pretraining_pool="SYNTH_POOL", steps_per_task=5, num_workers=0, on_corrupt=on_corrupt,
    )  # fmt: skip
    dm.set_preprocessing(preprocessing)
    dm.setup("fit")
    return dm


def cut(shard: Path, size: int) -> None:
    shard.write_bytes(shard.read_bytes()[:size])


def test_missing_splits_and_missing_and_short_shards_are_listed_in_one_error(bench, preprocessing):
    (bench / "DIGITS" / "train-000000.tar").unlink()  # an adaptation dataset's training shard
    cut(bench / "SYNTH_POOL" / "train-000000.tar", 0)  # the pretraining pool's
    cut(bench / "SHAPES" / "test-000000.tar", 3000)  # a held-out evaluation set's
    (bench / "LETTERS" / "test.index.safetensors").unlink()  # a split that is not prepared at all
    needed = int(ShardIndex.load(bench / "SHAPES", "test").shard_ends()[0])
    with pytest.raises(FileNotFoundError) as caught:
        set_up(bench, preprocessing, on_corrupt="raise")
    message = str(caught.value)
    assert "lacks 1 prepared split(s):\n  LETTERS/test\n" in message
    assert "3 shard(s) that this run reads are missing or shorter than their index says:" in message
    assert f"\n  shard {bench / 'DIGITS' / 'train-000000.tar'} is missing (" in message
    assert f"\n  shard {bench / 'SYNTH_POOL' / 'train-000000.tar'} is empty (" in message
    assert f"\n  shard {bench / 'SHAPES' / 'test-000000.tar'} ends at byte 3000 of {needed} (" in message


def test_with_on_corrupt_skip_a_short_shard_is_a_warning_and_a_missing_one_still_fatal(bench, preprocessing, caplog):
    shard = bench / "SHAPES" / "test-000000.tar"
    cut(shard, 3000)
    with caplog.at_level(logging.WARNING, logger="timelit"):
        set_up(bench, preprocessing, on_corrupt="skip")
    assert "1 shard(s) are shorter than their index says; the samples they lost will be skipped" in caplog.text
    assert f"shard {shard} ends at byte 3000 of " in caplog.text
    (bench / "DIGITS" / "train-000000.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) that this run reads are missing(.|\n)*DIGITS"):
        set_up(bench, preprocessing, on_corrupt="skip")


def test_the_check_reads_sizes_only_and_passes_intact_data(tiny_benchmark, bench, preprocessing, monkeypatch):
    opened = []
    monkeypatch.setattr(ShardIndex, "_handle", lambda self, shard: opened.append(shard))
    set_up(bench, preprocessing, on_corrupt="raise")  # the intact copy
    assert opened == []  # no shard was opened, let alone decoded
    index = ShardIndex.load(tiny_benchmark / "DIGITS", "train")
    assert shard_size_problems([index]) == ([], [])
    (size,) = shard_sizes(index)
    assert size.samples == len(index) and size.needed <= size.actual


@pytest.mark.parametrize(("size", "says"), [(0, "is empty (its index places"), (3000, "ends at byte 3000 of ")])
def test_reading_a_short_shard_says_what_happened_to_the_shard(bench, size, says):
    shard = bench / "SHAPES" / "test-000000.tar"
    cut(shard, size)
    index = ShardIndex.load(bench / "SHAPES", "test")
    with pytest.raises(CorruptSampleError) as caught:
        index.read(len(index) - 1)
    assert caught.value.shard_problem.startswith(f"shard {shard} {says}")
    assert "the file ends early" in str(caught.value)
