"""What a compute budget buys, without training (`timelit budget`, timelit/commands/budget.py): the steps and
samples per task at a measured cost per step, for the stream's length and for other lengths, so a sweep can be
planned before it is submitted. The numbers are the ones the ComputeBudget callback derives in `timelit fit`
(`timelit.training.flops`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from timelit.training.flops import BudgetError, Rounding, StepCost, steps_for_budget
from timelit.utilities.errors import yaml_problem

# FoMo-in-Flux's budget for ViT-B/16 at batch 512: 20 tasks x 1420 steps x 63,394.76 GFLOPs, rounded.
REFERENCE_TOTAL_GFLOPS = 1.8e9


@dataclass(frozen=True)
class TaskPlan:
    """What a budget buys when the stream has `num_tasks` tasks (`steps` is 0 when a task cannot afford a step)."""

    num_tasks: int
    gflops_per_task: float
    steps: int
    batch_size: int
    gflops_per_step: float

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps * self.num_tasks

    @property
    def spent_gflops(self) -> float:
        return self.steps * self.gflops_per_step


def plan_tasks(
    num_tasks: int,
    cost: StepCost,
    total_gflops: float | None = None,
    gflops_per_task: float | None = None,
    multiplier: float = 1.0,
    rounding: Rounding = "nearest",
) -> TaskPlan:
    """The steps per task that `total_gflops` (split over `num_tasks`) or `gflops_per_task` buys at `cost`."""
    per_task = gflops_per_task if gflops_per_task is not None else (total_gflops or 0.0) / num_tasks
    per_step = cost.gflops * multiplier
    steps = steps_for_budget(per_task, per_step, rounding) if per_task >= per_step else 0
    return TaskPlan(num_tasks, per_task, steps, cost.batch_size, per_step)


def read_fit_configs(paths: list[str]) -> dict[str, Any]:
    """Merge `timelit fit` configs as `--config a --config b` would (later keys win)."""
    from timelit.utilities.resources import resolve_config

    merged: dict[str, Any] = {}
    for name in paths:
        path = resolve_config(name)
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise BudgetError(f"config '{path}' is not valid YAML: {yaml_problem(error)}") from error
        if not isinstance(loaded, dict):
            raise BudgetError(f"config '{path}' is not a YAML mapping")
        _merge(merged, loaded)
    return merged


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A fit config's section (`model`, `data`), its `init_args` when it names a class."""
    found = config.get(name) or {}
    return dict(found.get("init_args", found)) if isinstance(found, dict) else {}


def default(cls: Any, name: str) -> Any:
    """The default of a constructor argument: what `timelit fit` uses when no config sets it."""
    return inspect.signature(cls).parameters[name].default


def format_report(
    cost: StepCost,
    chosen: TaskPlan,
    plans: list[TaskPlan],
    multiplier: float,
    rounding: str,
    source: str,
    config_steps: int | None = None,
) -> str:
    """The text `timelit budget` prints."""
    height, width = cost.image_size
    lines = [
        f"{cost.model_name}: {height}x{width} px, context {cost.context_length}, global batch {cost.batch_size}, "
        f"attention counted as {cost.attention} kernels",
        f"  one step  {cost.forward_gflops:,.2f} forward + {cost.backward_gflops:,.2f} backward = "
        f"{cost.gflops:,.2f} GFLOPs ({cost.gflops_per_sample:,.4f} per sample)",
    ]
    if multiplier != 1:
        lines.append(f"  charged   {chosen.gflops_per_step:,.2f} GFLOPs per step (multiplier {multiplier:g})")
    per_task = _fmt(chosen.gflops_per_task)
    lines.append(f"budget ({source}): {per_task} GFLOPs per task over {chosen.num_tasks} tasks ({rounding} step)")
    lines.append("  " + _describe(chosen))
    if config_steps is not None and source in ("options", "config") and config_steps != chosen.steps:
        lines.append(
            f"  note: the config's data.steps_per_task={config_steps} ({_fmt(config_steps * chosen.gflops_per_step)} "
            f"GFLOPs per task) conflicts with the budget; `timelit fit` refuses both together"
        )
    lines += ["", *_plan_table(plans)]
    return "\n".join(lines)


_COLUMNS = (
    ("tasks", 7),
    ("GFLOPs/task", 14),
    ("steps/task", 12),
    ("samples/task", 14),
    ("total steps", 13),
    ("samples", 14),
)


def _plan_table(plans: list[TaskPlan]) -> list[str]:
    """One right-aligned row per plan; a column widens past its usual width when a figure needs it (a budget of
    billions of steps), so that neighbouring numbers never run together."""
    rows = [
        [f"{plan.num_tasks}", _fmt(plan.gflops_per_task)]
        + (
            [f"{plan.steps:,}", f"{plan.samples:,}", f"{plan.total_steps:,}", f"{plan.total_steps * plan.batch_size:,}"]
            if plan.steps
            else []
        )
        for plan in plans
    ]
    widths = [max([width, *(len(row[i]) + 2 for row in rows if i < len(row))]) for i, (_, width) in enumerate(_COLUMNS)]
    lines = ["".join(f"{name:>{width}}" for (name, _), width in zip(_COLUMNS, widths))]
    for row in rows:
        text = "".join(f"{cell:>{width}}" for cell, width in zip(row, widths))
        lines.append(text if len(row) == len(_COLUMNS) else text + "   less than one step")
    return lines


def _fmt(gflops: float) -> str:
    return f"{gflops:,.0f}" if gflops >= 1000 else f"{gflops:.4g}"


def _describe(plan: TaskPlan) -> str:
    if plan.steps == 0:
        return (
            f"less than one step: a task needs at least {_fmt(plan.gflops_per_step)} GFLOPs "
            f"({_fmt(plan.gflops_per_step * plan.num_tasks)} in total); `timelit fit` refuses this budget"
        )
    overshoot = round(100 * (plan.spent_gflops / plan.gflops_per_task - 1), 3) + 0.0
    return (
        f"{plan.steps:,} steps per task ({plan.samples:,} samples), {plan.total_steps:,} steps "
        f"({plan.total_steps * plan.batch_size:,} samples) in total; spends {_fmt(plan.spent_gflops)} GFLOPs per task "
        f"({overshoot:+.3f}% of its budget)"
    )
