"""StepEMA: the per-task EMA of the weights is what TimeMerge stores as the expert, and it restarts every task."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from timelit.data.datamodule import TimeDataModule
from timelit.training.callbacks.ema import StepEMA
from timelit.training.callbacks.time_merge import TimeMerge
from timelit.training.model import CLIPFineTuner


class LiveWeights(Callback):
    def __init__(self) -> None:
        self.after_step: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append((trainer.current_epoch, {k: v.clone() for k, v in pl_module.model.state_dict().items()}))


@pytest.mark.slow
@pytest.mark.parametrize("ema_first", [True, False])
def test_experts_are_the_per_task_ema_of_the_live_weights(tiny_benchmark, tmp_path, ema_first):
    L.seed_everything(0)
    live, ema, merge = LiveWeights(), StepEMA(decay=0.5), TimeMerge(init="ft", deploy="ft")
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0,
        reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False,
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run", version=""),
        callbacks=[ema, merge, live] if ema_first else [merge, ema, live],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    model = CLIPFineTuner(
        model_name="timelit-micro-ViT", pretrained=str(tiny_benchmark / "base_model.safetensors"), lr=1e-2
    )
    data = TimeDataModule(
        data_root=str(tiny_benchmark), manifests=str(tiny_benchmark), stream="random", num_tasks=2, batch_size=16,
        pretraining_pool="SYNTH_POOL", steps_per_task=3, num_workers=0,
    )  # fmt: skip
    trainer.fit(model, data)
    for task in range(2):
        steps = [w for t, w in live.after_step if t == task]
        expected = dict(steps[0])
        for weights in steps[1:]:
            expected = {k: 0.5 * expected[k] + 0.5 * weights[k] for k in expected}
        stored = load_file(str(tmp_path / "run" / "experts" / f"expert_{task:04d}.safetensors"))
        assert all(torch.allclose(stored[k], expected[k], atol=1e-6) for k in stored)
        assert not all(torch.equal(stored[k], steps[-1][k]) for k in stored)  # not simply the live weights


def test_decay_outside_its_range_is_rejected():
    with pytest.raises(ValueError, match="decay"):
        StepEMA(decay=1.0)


def test_the_average_follows_the_model_to_its_training_device():
    """Lightning calls `setup` before the strategy moves the model; the average must end up where the model trains
    (the meta device stands in for a GPU here)."""
    model = torch.nn.Module()
    model.model = torch.nn.Linear(2, 2)
    model.device = torch.device("cpu")
    ema = StepEMA()
    ema.setup(None, model, "fit")
    model.device = torch.device("meta")  # what the strategy did between `setup` and `on_fit_start`
    ema.on_fit_start(None, model)
    assert {p.device.type for p in ema.average_model.parameters()} == {"meta"}
    assert ema.average_model.n_averaged.device.type == "meta"
    pinned = StepEMA(device="cpu")
    pinned.setup(None, model, "fit")
    pinned.on_fit_start(None, model)
    assert {p.device.type for p in pinned.average_model.parameters()} == {"cpu"}
