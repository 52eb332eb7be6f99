"""A world size that does not divide the global batch fails when `fit` sets the data up, before any evaluation."""

from __future__ import annotations

import lightning as L
import pytest

from timelit.data.datamodule import TimeDataModule


def data(benchmark, batch_size: int) -> TimeDataModule:
    return TimeDataModule(
        data_root=str(benchmark), manifests=str(benchmark), stream="random", num_tasks=2, batch_size=batch_size,
        pretraining_pool="SYNTH_POOL", steps_per_task=2, num_workers=0,
    )  # fmt: skip


def trainer(devices: int, num_nodes: int = 1) -> L.Trainer:
    """A Trainer of `num_nodes x devices` CPU ranks (built, not launched: this process is rank 0)."""
    return L.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp", logger=False)


def test_a_world_size_that_does_not_divide_the_batch_fails_at_setup_naming_both(tiny_benchmark):
    dm = data(tiny_benchmark, batch_size=16)
    dm.trainer = trainer(devices=3, num_nodes=2)
    with pytest.raises(ValueError, match=r"data.batch_size 16 .* world size 6 \(2 nodes x 3 devices\)") as error:
        dm.setup("fit")
    assert "1, 2, 4, 8, 16" in str(error.value)
    assert not hasattr(dm, "stream")  # nothing was loaded first


@pytest.mark.parametrize(("devices", "stage"), [(4, "fit"), (3, "validate")])
def test_a_dividing_world_size_or_an_evaluation_is_set_up(tiny_benchmark, devices, stage):
    dm = data(tiny_benchmark, batch_size=16)
    dm.trainer = trainer(devices=devices)
    dm.setup(stage)
    assert len(dm.stream.tasks) == 2
