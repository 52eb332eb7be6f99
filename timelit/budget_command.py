"""`timelit budget`: what a compute budget buys, without training.

    timelit budget --fit_config best_in_time.yaml
    timelit budget --model_name ViT-B-16 --batch_size 512 --total_gflops 1.8e9 --num_tasks 20

Prints the measured GFLOPs of one training step (and per sample) for a model and global batch, the steps and samples
each task gets under the budget, and the same for 20 / 50 / 100 / 200 tasks, so a sweep can be planned before it is
submitted. The numbers are the ones the ComputeBudget callback derives in `timelit fit` (`timelit.flops`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from timelit.flops import AttentionCount, Rounding, StepCost, measure_step, steps_for_budget

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


def _read_configs(paths: list[str]) -> dict[str, Any]:
    """Merge `timelit fit` configs as `--config a --config b` would (later keys win)."""
    from timelit.resources import resolve_config

    merged: dict[str, Any] = {}
    for name in paths:
        path = resolve_config(name)
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config '{path}' is not a YAML mapping")
        _merge(merged, loaded)
    return merged


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name) or {}
    return dict(section.get("init_args", section)) if isinstance(section, dict) else {}


def _default(cls: Any, name: str) -> Any:
    return inspect.signature(cls).parameters[name].default


def budget_command(
    fit_config: list[str] | str | None = None,
    model_name: str | None = None,
    batch_size: int | None = None,
    num_tasks: int | None = None,
    total_gflops: float | None = None,
    gflops_per_task: float | None = None,
    multiplier: float | None = None,
    attention: AttentionCount | None = None,
    rounding: Rounding | None = None,
    table: list[int] = [20, 50, 100, 200],  # noqa: B006 (jsonargparse shows a literal default in --help)
) -> None:
    """Print GFLOPs per step and the steps and samples per task a compute budget buys, without training.

    Values come from the options, else from FIT_CONFIG (`model.init_args.model_name`, `data.init_args.batch_size`,
    `data.init_args.num_tasks`, the `budget:` section), else from the defaults of CLIPFineTuner, TimeDataModule and
    ComputeBudget; with no budget anywhere, FoMo-in-Flux's 1.8e9 GFLOPs.

    Args:
        fit_config: the config(s) given to `timelit fit --config`: a path, a shipped name, or a list
            `'[quickstart.yaml, budget/quickstart.yaml]'` merged in order.
        model_name: open_clip architecture; image size and context length come from its config.
        batch_size: global batch size (all ranks and sources together).
        num_tasks: tasks in the stream.
        total_gflops: the whole stream's budget in GFLOPs.
        gflops_per_task: each task's budget in GFLOPs, instead of a total.
        multiplier: charge each step GFLOPs x this factor (memory-adjusted FLOPs; 1 for full fine-tuning).
        attention: count attention as the fused GPU kernels ('fused', the reference's count) or the math path.
        rounding: steps per task rounded to the nearest step ('nearest', the reference table) or down ('floor').
        table: stream lengths for the comparison table.
    """
    from timelit.callbacks.budget import ComputeBudget
    from timelit.data.datamodule import TimeDataModule
    from timelit.model import CLIPFineTuner

    paths = [fit_config] if isinstance(fit_config, str) else list(fit_config or [])
    config = _read_configs(paths) if paths else {}
    model, data, budget = _section(config, "model"), _section(config, "data"), dict(config.get("budget") or {})
    model_name = model_name or model.get("model_name") or _default(CLIPFineTuner, "model_name")
    batch_size = int(batch_size or data.get("batch_size") or _default(TimeDataModule, "batch_size"))
    num_tasks = int(num_tasks or data.get("num_tasks") or _default(TimeDataModule, "num_tasks"))
    multiplier = float(multiplier if multiplier is not None else budget.get("multiplier", 1.0))
    attention = attention or budget.get("attention") or _default(ComputeBudget, "attention")
    rounding = rounding or budget.get("rounding") or _default(ComputeBudget, "rounding")
    # Building the callback validates the budget options exactly as `timelit fit` does.
    ComputeBudget(total_gflops, gflops_per_task, multiplier, attention, rounding)  # type: ignore[arg-type]
    cost = measure_step(model_name, batch_size, attention)  # type: ignore[arg-type]
    config_steps = data.get("steps_per_task")
    source = "options"
    if total_gflops is None and gflops_per_task is None:
        total_gflops, gflops_per_task = budget.get("total_gflops"), budget.get("gflops_per_task")
        source = "config"
    if total_gflops is None and gflops_per_task is None and config_steps is not None:
        # No budget, fixed steps: show what those steps spend, and what the same compute buys over other lengths.
        total_gflops = int(config_steps) * num_tasks * cost.gflops * multiplier
        source = f"none set: what data.steps_per_task={config_steps} spends"
    elif total_gflops is None and gflops_per_task is None:
        total_gflops, source = REFERENCE_TOTAL_GFLOPS, "FoMo-in-Flux reference"
    total_gflops = float(total_gflops) if total_gflops is not None else None
    gflops_per_task = float(gflops_per_task) if gflops_per_task is not None else None

    plans = [plan_tasks(t, cost, total_gflops, gflops_per_task, multiplier, rounding) for t in table]  # type: ignore[arg-type]
    chosen = plan_tasks(num_tasks, cost, total_gflops, gflops_per_task, multiplier, rounding)  # type: ignore[arg-type]
    print(format_report(cost, chosen, plans, multiplier, rounding, source, config_steps))


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
    header = f"{'tasks':>7}{'GFLOPs/task':>14}{'steps/task':>12}{'samples/task':>14}{'total steps':>13}{'samples':>14}"
    lines += ["", header]
    for plan in plans:
        if plan.steps == 0:
            lines.append(f"{plan.num_tasks:>7}{_fmt(plan.gflops_per_task):>14}   less than one step")
            continue
        lines.append(
            f"{plan.num_tasks:>7}{_fmt(plan.gflops_per_task):>14}{plan.steps:>12,}{plan.samples:>14,}"
            f"{plan.total_steps:>13,}{plan.total_steps * plan.batch_size:>14,}"
        )
    return "\n".join(lines)


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
