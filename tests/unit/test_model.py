"""CLIPFineTuner and its optimizer: parameter groups, the schedule that restarts every task, fresh AdamW moments at
each task start, and which AdamW kernel runs under which precision."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from timelit.training.model import CLIPFineTuner
from timelit.training.optim import TaskCosineSchedule, parameter_groups, task_lr_factor

MICRO = "timelit-micro-ViT"


def test_gains_biases_and_logit_scale_are_not_decayed_unless_asked():
    model = CLIPFineTuner(model_name=MICRO, pretrained=None).model
    decayed, exempt = parameter_groups(model, 0.2, decay_norms_and_biases=False)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.2 and exempt["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and "logit_scale" not in names[id(p)] for p in decayed["params"])
    assert {"logit_scale"} <= {names[id(p)] for p in exempt["params"]}
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))
    (everything,) = parameter_groups(model, 0.2, decay_norms_and_biases=True)  # the pipeline decays all
    assert len(everything["params"]) == len(list(model.parameters()))


def test_the_schedule_warms_up_decays_and_restarts_at_every_task():
    steps = 20  # warm-up ceil(0.1 * 20) = 2 steps
    assert [task_lr_factor(s, steps, 0.1, 0.001) for s in (0, 1)] == [0.5, 1.0]
    assert task_lr_factor(steps - 1, steps, 0.1, 0.001) == pytest.approx(0.001, abs=0.01)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = TaskCosineSchedule(optimizer, steps, 0.1, 0.001)
    lrs = []
    for _ in range(2 * steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:steps] == lrs[steps:]  # task 1 repeats task 0's schedule
    assert lrs[0] == pytest.approx(0.5e-3) and min(lrs) == pytest.approx(lrs[steps - 1])


# What timelit.training.contracts.TrainingBatches promises, 10 steps per task.
BATCHES = SimpleNamespace(
    batch_size=8, steps_per_task=10, require_steps=lambda: 10, set_steps_per_task=lambda steps: None
)


def module_with(precision_plugin: Precision, **hparams) -> CLIPFineTuner:
    module = CLIPFineTuner(model_name=MICRO, pretrained=None, **hparams)
    datamodule = BATCHES
    module.trainer = SimpleNamespace(precision_plugin=precision_plugin, datamodule=datamodule)  # type: ignore[assignment]
    return module


@pytest.mark.parametrize(
    ("plugin", "fused", "expected"),
    [
        (Precision(), None, True),  # 32-true: the fused kernel
        (MixedPrecision("bf16-mixed", "cpu"), None, None),  # Lightning cannot clip for fused optimizers here
        (Precision(), False, False),
    ],
)
def test_adamw_is_fused_unless_mixed_precision_or_turned_off(plugin, fused, expected):
    optimizer = module_with(plugin, fused=fused).configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is expected


class AtTask(CLIPFineTuner):
    """CLIPFineTuner whose position in the stream is set by the test instead of a Trainer's loop."""

    task = 0
    current_epoch = property(lambda self: self.task)  # type: ignore[assignment]
    global_step = property(lambda self: 5)  # type: ignore[assignment]
    global_rank = property(lambda self: 0)  # type: ignore[assignment]


def test_every_task_starts_with_fresh_adamw_moments():
    module = AtTask(model_name=MICRO, pretrained=None)
    module.trainer = SimpleNamespace(precision_plugin=Precision(), datamodule=BATCHES)
    optimizer = module.configure_optimizers()["optimizer"]
    module.trainer.optimizers = [optimizer]
    parameter = next(module.model.parameters())
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    module.optimizer_task = 0
    module.on_train_batch_start(None, 0)  # the same task, e.g. after a mid-task resume: the moments are kept
    assert optimizer.state
    module.task = 1
    module.on_train_batch_start(None, 0)
    assert not optimizer.state and module.optimizer_task == 1


def test_an_unknown_architecture_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"ViT-B-61.*not an open_clip architecture(.|\n)*ViT-B-16"):
        CLIPFineTuner(model_name="ViT-B-61", pretrained=None)
