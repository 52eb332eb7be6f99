"""`timelit budget`: what a compute budget buys, without training.

    timelit budget --fit_config best_in_time.yaml
    timelit budget --model_name ViT-B-16 --batch_size 512 --total_gflops 1.8e9 --num_tasks 20

Prints the measured GFLOPs of one training step (and per sample) for a model and global batch, the steps and samples
each task gets under the budget, and the same for 20 / 50 / 100 / 200 tasks (timelit/study/budget.py).
"""

from __future__ import annotations

from typing import Any

from timelit.study.budget import (
    REFERENCE_TOTAL_GFLOPS,
    default,
    format_report,
    plan_tasks,
    read_fit_configs,
    section,
)
from timelit.training.flops import AttentionCount, BudgetError, Rounding, measure_step


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
    from timelit.data.datamodule import TimeDataModule
    from timelit.training.callbacks.budget import ComputeBudget
    from timelit.training.model import CLIPFineTuner

    paths = [fit_config] if isinstance(fit_config, str) else list(fit_config or [])
    config = read_fit_configs(paths) if paths else {}
    model, data, budget = section(config, "model"), section(config, "data"), dict(config.get("budget") or {})
    model_name = model_name or model.get("model_name") or default(CLIPFineTuner, "model_name")
    # `is None`, not `or`: a 0 given is an error to report, not a request for the default.
    batch_size = int(_given(batch_size, data.get("batch_size"), default(TimeDataModule, "batch_size")))
    num_tasks = int(_given(num_tasks, data.get("num_tasks"), default(TimeDataModule, "num_tasks")))
    if num_tasks < 1:
        raise BudgetError(f"num_tasks must be at least 1, got {num_tasks}")
    multiplier = float(multiplier if multiplier is not None else budget.get("multiplier", 1.0))
    attention = attention or budget.get("attention") or default(ComputeBudget, "attention")
    rounding = rounding or budget.get("rounding") or default(ComputeBudget, "rounding")
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


def _given(*values: Any) -> Any:
    """The first of `values` that is not None."""
    return next(value for value in values if value is not None)
