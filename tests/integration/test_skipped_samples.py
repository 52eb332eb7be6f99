"""Skip accounting in a real `timelit fit` (issue 20, item 5): three damaged training images and an empty evaluation
shard are counted exactly, per dataset split and shard, in results.json, its figures, TensorBoard and the log, and the
empty shard is one message, not one per sample."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from timelit.commands.cli import run_lightning
from timelit.data.shards import ShardIndex

pytestmark = pytest.mark.slow

PROBES = Path(__file__).resolve().parent  # probes.RankProbe records the sample keys of every step


def drawn_keys(run: Path) -> list[str]:
    record = json.loads((run / "probe_rank0.json").read_text())
    return [key for _task, _step, keys in record["keys"] for key in keys]


def positions_of(index: ShardIndex, keys: set[str]) -> list[int]:
    return [p for p in range(len(index)) if index.read(p)["__key__"] in keys]


def scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_damaged_samples_and_an_empty_shard_are_counted_exactly_and_reported_once(
    tiny_benchmark, tmp_path, quick_fit_args, damage_sample, monkeypatch, caplog
):
    monkeypatch.syspath_prepend(str(PROBES))
    bench = tmp_path / "bench"
    shutil.copytree(tiny_benchmark, bench)
    run_lightning(quick_fit_args(bench, tmp_path / "intact", "--trainer.callbacks+=probes.RankProbe", tasks=2, steps=2))
    # Three images that the run surely reads: ones its intact twin drew in the first task.
    keys = drawn_keys(tmp_path / "intact" / "run")
    dataset = next(key.split("/")[0] for key in keys if key.split("/")[0] != "SYNTH_POOL")
    chosen = sorted({key for key in keys if key.startswith(f"{dataset}/")})[:3]
    train = ShardIndex.load(bench / dataset, "train")
    for position in positions_of(train, set(chosen)):
        damage_sample(train, position)
    held_out = ShardIndex.load(bench / "SHAPES", "test")
    (bench / "SHAPES" / "test-000000.tar").write_bytes(b"")
    lost = len(held_out)

    with caplog.at_level(logging.INFO, logger="timelit"):
        run_lightning(quick_fit_args(bench, tmp_path, tasks=2, steps=2))

    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["skipped"] == {
        f"{dataset}/train": {"samples": 3, "shards": {"train-000000.tar": 3}},
        "SHAPES/test": {"samples": lost, "shards": {"test-000000.tar": lost}},
    }
    zero_shot, *_, last = results["points"]
    assert zero_shot["skipped"] == {"SHAPES/test": lost}  # the evaluation before any training
    assert last["skipped"] == {f"{dataset}/train": 3, "SHAPES/test": lost}
    subset = zero_shot["datasets"]["SHAPES"]
    assert subset["skipped"] > 0 and subset["n"] == 0  # the figure says what it lacks
    assert results["full"]["end"]["datasets"]["SHAPES"]["skipped"] == lost

    messages = [record.getMessage() for record in caplog.records]
    assert sum("skipping a sample that does not decode" in m for m in messages) == 3
    shard_messages = [m for m in messages if m.endswith("the samples it lost are skipped")]
    assert shard_messages == [
        f"shard {bench / 'SHAPES' / 'test-000000.tar'} is empty (its index places {lost} samples in "
        f"{int(held_out.shard_ends()[0])} bytes): the samples it lost are skipped"
    ]
    assert f"the run skipped {3 + lost} sample(s): {dataset}/train 3 (train-000000.tar), SHAPES/test {lost}" in (
        "\n".join(messages)
    )

    logged = scalars(run)
    assert logged["skipped/total"][-1] == 3 + lost
    assert logged[f"skipped/{dataset}/train"][-1] == 3 and logged["skipped/SHAPES/test"][-1] == lost
    assert not any(tag.endswith("/skipped") for tag in logged)  # a count is not an evaluation figure
