"""AdamW parameter groups and the per-task learning-rate schedule.

The reference pipeline re-creates its optimizer and scheduler at every task: linear warm-up over the first 10% of a
task's steps, then cosine decay to `min_lr_ratio` (0.001) of the base rate, restarting at the next task. Here the
schedule is one LRScheduler whose position within the task is its step count modulo the (equal) task length, so its
whole state is one integer that Lightning checkpoints; the AdamW moments are cleared at every task start by the
LightningModule.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


def parameter_groups(model: nn.Module, weight_decay: float, decay_norms_and_biases: bool) -> list[dict]:
    """Decay matrices; gains, biases, embeddings of one dimension and `logit_scale` only if asked.

    open_clip trains without decay on them; the FoMo-in-Flux pipeline decays every parameter (0.2).
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2 or "logit_scale" in name
        (no_decay if exempt and not decay_norms_and_biases else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def task_lr_factor(step_in_task: int, steps_per_task: int, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at a step of a task (0-based)."""
    warmup = math.ceil(warmup_fraction * steps_per_task)
    if step_in_task < warmup:
        return (step_in_task + 1) / warmup
    decay_steps = max(1, steps_per_task - warmup)
    progress = min(1.0, (step_in_task - warmup) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TaskCosineSchedule(LRScheduler):
    """Linear warm-up then cosine decay within every task, restarted at each task (stepped once per step)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps_per_task: int,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.001,
        last_epoch: int = -1,
    ):
        if steps_per_task < 1:
            raise ValueError(f"steps_per_task must be at least 1, got {steps_per_task}")
        self.steps_per_task = steps_per_task
        self.warmup_fraction = warmup_fraction
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = max(0, self.last_epoch) % self.steps_per_task
        factor = task_lr_factor(step, self.steps_per_task, self.warmup_fraction, self.min_lr_ratio)
        return [base_lr * factor for base_lr in self.base_lrs]
