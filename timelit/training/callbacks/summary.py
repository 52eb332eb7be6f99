"""StepCostSummary: Lightning's model summary with the cost a run's budget is counted in, instead of a zero.

    timelit fit --config quickstart.yaml      (printed once, at the start of fit)

Lightning's summary has a FLOPs column and a "Total Flops" line, which it measures only for a module with an
`example_input_array`; CLIPFineTuner has none (its batch is an image-text pair of the data module's making), so
both read 0, beside the GFLOPs per step that ComputeBudget measured (`timelit.training.flops`). This summary keeps the
layer table and parameter counts and ends with that measured cost. `timelit.training.lightning_cli` puts it in place of
the default summary Lightning adds; a ModelSummary of the user's own (`trainer.callbacks`) is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from typing_extensions import override

from timelit.training.callbacks.budget import ComputeBudget

log = logging.getLogger(__name__)

_LEFT_OUT = ("FLOPs",)


class StepCostSummary(ModelSummary):
    """The layer table and parameter counts of Lightning's ModelSummary, and the GFLOPs of one training step.

    Args:
        max_depth: depth of the layer table, as Lightning's (0 turns the summary off).
    """

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)
        self.step_cost: str | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        budget = next((c for c in trainer.callbacks if isinstance(c, ComputeBudget)), None)  # type: ignore[attr-defined]
        if budget is not None and budget.cost is not None:
            cost = budget.cost
            self.step_cost = (
                f"{budget.gflops_per_step:<10,.6g}GFLOPs per training step ({cost.model_name} at global batch "
                f"{cost.batch_size}, timelit.training.flops)"
            )
        super().on_fit_start(trainer, pl_module)

    @override
    def summarize(  # type: ignore[override]
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name not in _LEFT_OUT]
        widths = [max(len(name), *(len(value) for value in values), 1) for name, values in columns]
        header = " | ".join(name.ljust(width) for (name, _), width in zip(columns, widths))
        rule = "-" * len(header)
        rows = [
            " | ".join(values[row].ljust(width) for (_, values), width in zip(columns, widths)).rstrip()
            for row in range(len(columns[0][1]) if columns else 0)
        ]
        totals = [
            f"{get_human_readable_count(trainable_parameters):<10}Trainable params",
            f"{get_human_readable_count(total_parameters - trainable_parameters):<10}Non-trainable params",
            f"{get_human_readable_count(total_parameters):<10}Total params",
            f"{model_size:<10.3f}Total estimated model params size (MB)",
        ]
        if self.step_cost is not None:
            totals.append(self.step_cost)
        log.info("\n".join(["", header.rstrip(), rule, *rows, rule, *totals]))
