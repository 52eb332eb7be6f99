"""StepEMA: an exponential moving average of the weights over the steps of each task (optional).

    timelit fit --config quickstart.yaml --trainer.callbacks+=timelit.training.callbacks.ema.StepEMA \
        --trainer.callbacks.decay 0.99

Which weights are "the expert": with StepEMA, TimeMerge stores the step-EMA of a task's weights as that task's
expert θ_t (its `averaged_weights()`), so the task EMA, `all` merges, deployment and the next task's init all see the
averaged weights; the live weights keep training undisturbed. Without it the expert is the live weights at the end
of the task. The average restarts at every task: its first update of a task takes the weights after that task's first
optimizer step.

Built on Lightning's WeightAveraging (torch's AveragedModel with the fused `_foreach_lerp_` EMA of
`get_ema_multi_avg_fn`), changed where TIME needs it: it averages the open_clip model only, not the whole
LightningModule; it restarts per task; it does not swap itself in for evaluation (TimeMerge decides what is
evaluated) nor copy the average into the model when training ends; and it keeps the average in its own checkpoint
state instead of replacing the checkpoint's `state_dict` (Lightning's layout, under which the module's weights in a
checkpoint would be the average rather than the live weights TimeMerge resumes from).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from typing_extensions import override


class StepEMA(WeightAveraging):
    """Per-task EMA of the weights, used by TimeMerge as the expert.

    Args:
        decay: weight of the running average at each update (average = decay * average + (1 - decay) * weights).
        update_every_n_steps: update after every n-th optimizer step.
        device: where the average lives (default: the device the model trains on).
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, device: str | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"StepEMA decay must lie in [0, 1), got {decay}")
        multi_avg_fn = get_ema_multi_avg_fn(decay)
        super().__init__(device=device, use_buffers=True, multi_avg_fn=multi_avg_fn)
        # This callback's own state: every hook of WeightAveraging that reads the base class's (private) state is
        # overridden below, so nothing here depends on Lightning's private attributes.
        self.decay, self.update_every_n_steps = decay, update_every_n_steps
        self.average_device = torch.device(device) if isinstance(device, str) else device
        self.multi_avg_fn = multi_avg_fn
        self.average_model: AveragedModel | None = None
        self.latest_update_step = 0  # the global step of the latest update
        self.task = -1
        self._pending: dict[str, Any] | None = None

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.average_model is None:
            device = self.average_device or pl_module.device
            self.average_model = AveragedModel(
                pl_module.model, device=device, use_buffers=True, multi_avg_fn=self.multi_avg_fn
            )
            if self._pending is not None:
                self.load_state_dict(self._pending)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # `setup` runs before the strategy moves the model to its device: an average built there would stay on the
        # CPU and copy every parameter to the host at each update.
        if self.average_device is None and self.average_model is not None:
            self.average_model.to(pl_module.device)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch != self.task:  # a new task: the next update restarts the average from the weights
            assert self.average_model is not None
            self.average_model.n_averaged.zero_()
            self.task = trainer.current_epoch

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer, pl_module)

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fold in this step's weights, once per step whoever asks first."""
        step_idx = trainer.global_step - 1
        if trainer.global_step > self.latest_update_step and self.should_update(step_idx=step_idx):
            assert self.average_model is not None
            self.average_model.update_parameters(pl_module.model)
            self.latest_update_step = trainer.global_step

    def averaged_weights(
        self, trainer: L.Trainer | None = None, pl_module: L.LightningModule | None = None
    ) -> dict[str, torch.Tensor]:
        """The averaged open_clip weights on the CPU: what TimeMerge stores as the task's expert.

        Given the trainer and module, the current step is folded in first, so the answer does not depend on whether
        TimeMerge's batch-end hook runs before or after this callback's.
        """
        assert self.average_model is not None, "StepEMA used before setup()"
        if trainer is not None and pl_module is not None:
            self._update(trainer, pl_module)
        return {k: v.detach().to("cpu", copy=True) for k, v in self.average_model.module.state_dict().items()}

    # Lightning's hooks that this callback deliberately does not use (see the module docstring).
    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None: ...

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None: ...

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None: ...

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None: ...

    @override
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None: ...

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None: ...

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"latest_update_step": self.latest_update_step, "task": self.task}
        if self.average_model is not None:
            state["average"] = self.averaged_weights()  # no update here: saving must not change the average
            state["n_averaged"] = self.average_model.n_averaged.detach().cpu().clone()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.average_model is None:
            self._pending = state_dict
            return
        self.latest_update_step = int(state_dict["latest_update_step"])
        self.task = int(state_dict["task"])
        if "average" in state_dict:
            self.average_model.module.load_state_dict(state_dict["average"])
            self.average_model.n_averaged.copy_(state_dict["n_averaged"])
        self._pending = None
