"""ComputeBudget: every task trains for the steps its share of a GFLOP budget buys, and the spend is reported.

    timelit fit --config best_in_time.yaml --budget.total_gflops 1.8e9

FoMo-in-Flux (arXiv 2408.14471, Sec. 3) gives every method the same compute, a total GFLOP budget split evenly over
the tasks: 1.8e9 GFLOPs for ViT-B/16 at batch 512 is 1420 steps in each of 20 tasks (568 / 284 / 142 for 50 / 100 /
200 tasks). timelit measures the GFLOPs of one step (`timelit.training.flops`) instead of fixing the steps by hand, so
the same budget gives a smaller model or batch more steps. The callback

* in `setup` (before `configure_optimizers` and `train_dataloader` read it) measures GFLOPs per step for the model and
  the global batch, and sets `data.steps_per_task` = budget per task / (GFLOPs per step x multiplier);
* at the first batch of every task checks, on every rank together, that the task's loader is exactly that long. A
  task is an epoch of a sized loader (docs/ARCHITECTURE.md, decision 2): the data module builds `steps_per_task`
  batches on every rank, so each task ends at its budget on every rank by construction. A loader that would run past
  the budget is refused before its first step (Lightning has no public way for a callback to end one epoch early);
* counts the steps and GFLOPs spent, per task and in total: TensorBoard `budget/gflops` (cumulative, per step) and
  `budget/gflops_task` (at each task end), and results.json (`task_record`, `run_record`, read by TaskResults).

Without a budget (the default) it only meters: a run with `data.steps_per_task` set reports what it spent.
Checkpoint: `state_dict` holds the counters and the derived steps per task, so a resumed run continues the counts
exactly and refuses to resume under a budget that would change the steps per task.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from timelit.training.contracts import TaskStream, TrainingBatches, datamodule_as
from timelit.training.flops import AttentionCount, BudgetError, Rounding, StepCost, measure_step, steps_for_budget
from timelit.training.lightning_internals import reaches_logger

log = logging.getLogger(__name__)


class ComputeBudget(Callback):
    """Derives each task's steps from a GFLOP budget, holds every task to them and reports GFLOPs spent.

    Give one of `total_gflops` (split evenly over `data.num_tasks`) and `gflops_per_task`, or neither to meter only.

    Args:
        total_gflops: the whole stream's budget in GFLOPs (FoMo-in-Flux, ViT-B/16: 1.8e9).
        gflops_per_task: the budget of each task in GFLOPs, instead of a total.
        multiplier: charge each step GFLOPs x this factor: the memory-adjusted FLOPs of the reference, peak memory of
            a method relative to full fine-tuning (1 for full fine-tuning, which is what timelit trains).
        attention: count attention as the fused GPU kernels do (their backward recomputes the scores; the
            reference's count) or as the unfused math path (see `timelit.training.flops`).
        rounding: steps per task = budget / cost rounded to the nearest step (reproduces the reference table) or
            down (never exceeds the budget).

    Example::

        trainer = Trainer(callbacks=[ComputeBudget(total_gflops=1.8e9)], max_epochs=20)
        trainer.fit(CLIPFineTuner(), datamodule=TimeDataModule(..., num_tasks=20, batch_size=512))
    """

    def __init__(
        self,
        total_gflops: float | None = None,
        gflops_per_task: float | None = None,
        multiplier: float = 1.0,
        attention: AttentionCount = "fused",
        rounding: Rounding = "nearest",
    ):
        if total_gflops is not None and gflops_per_task is not None:
            raise BudgetError(
                f"budget.total_gflops={total_gflops:g} and budget.gflops_per_task={gflops_per_task:g} are both set; "
                f"choose one"
            )
        for name, value in (("total_gflops", total_gflops), ("gflops_per_task", gflops_per_task)):
            if value is not None and not value > 0:
                raise BudgetError(f"budget.{name} must be a positive number of GFLOPs, got {value}")
        if not multiplier > 0:
            raise BudgetError(f"budget.multiplier must be positive, got {multiplier}")
        if attention not in ("fused", "math"):
            raise BudgetError(f"budget.attention must be 'fused' or 'math', got {attention!r}")
        if rounding not in ("nearest", "floor"):
            raise BudgetError(f"budget.rounding must be 'nearest' or 'floor', got {rounding!r}")
        self.total_gflops = total_gflops
        self.gflops_per_task = gflops_per_task
        self.multiplier = multiplier
        self.attention: AttentionCount = attention
        self.rounding: Rounding = rounding
        self.cost: StepCost | None = None
        self.steps_per_task: int | None = None
        self.num_tasks: int | None = None
        # Counters (checkpointed): batches trained and GFLOPs spent in the current task and in the whole stream.
        self.task = -1
        self.task_steps = 0
        self.task_gflops = 0.0
        self.steps = 0
        self.gflops = 0.0
        self._checked_task = -1  # not checkpointed: a resumed run checks its loader again

    @property
    def active(self) -> bool:
        """Whether a budget is set (otherwise the callback only meters)."""
        return self.total_gflops is not None or self.gflops_per_task is not None

    @property
    def gflops_per_step(self) -> float:
        """GFLOPs charged per step: the measured cost times the multiplier."""
        if self.cost is None:
            raise RuntimeError("ComputeBudget has not measured the model yet (it does so in setup)")
        return self.cost.gflops * self.multiplier

    # ---------------------------------------------------------------- set-up

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value:
            return
        datamodule = datamodule_as(trainer, TrainingBatches)
        stream = datamodule_as(trainer, TaskStream)
        model_name = pl_module.hparams.get("model_name")
        if datamodule is None or stream is None or model_name is None:
            if self.active:
                missing = ["a task-stream data module"] if datamodule is None or stream is None else []
                missing += ["model.model_name"] if model_name is None else []
                raise ValueError(
                    f"ComputeBudget needs a LightningModule with a `model_name` hyperparameter (an open_clip "
                    f"architecture) and a task-stream data module passed as Trainer.fit(datamodule=...) (see "
                    f"timelit.training.contracts.TaskStream); missing: {', '.join(missing)}"
                )
            return
        self.num_tasks = int(stream.num_tasks)
        try:
            self.cost = measure_step(model_name, int(datamodule.batch_size), self.attention)
        except Exception as error:
            if self.active:
                raise
            # Metering is a courtesy without a budget: a model it cannot count must not stop the run.
            rank_zero_warn(f"ComputeBudget could not count the FLOPs of {model_name!r}, GFLOPs go unreported: {error}")
            return
        if not self.active:
            self.steps_per_task = datamodule.steps_per_task
            return
        steps = self._derive_steps(datamodule)
        # Every rank measured on its own: make sure they agree (e.g. nodes with different torch versions).
        same = steps == trainer.strategy.broadcast(steps)
        if not trainer.strategy.reduce_boolean_decision(same, all=True):
            raise RuntimeError(f"ranks derived different steps per task from the budget (rank 0 differs from {steps})")
        explicit = datamodule.steps_per_task
        if explicit is not None and explicit != steps:
            raise BudgetError(
                f"data.steps_per_task={explicit} conflicts with the compute budget, which gives {steps} steps per "
                f"task ({self._describe()}); remove data.steps_per_task or the `budget:` section"
            )
        self.steps_per_task = steps
        datamodule.set_steps_per_task(steps)
        if trainer.is_global_zero:
            log.info("compute budget: %s -> %d steps per task", self._describe(), steps)

    def budget_per_task(self, num_tasks: int | None = None) -> float:
        """GFLOPs each task may spend in a stream of `num_tasks` tasks (default: the data module's)."""
        num_tasks = num_tasks or self.num_tasks
        if self.gflops_per_task is not None:
            return self.gflops_per_task
        if self.total_gflops is None or not num_tasks:
            raise RuntimeError("ComputeBudget has no budget, or does not know the number of tasks yet")
        return self.total_gflops / num_tasks

    def _derive_steps(self, datamodule: TrainingBatches) -> int:
        per_task = self.budget_per_task()
        if per_task < self.gflops_per_step:
            source = (
                f"budget.gflops_per_task={self.gflops_per_task:g}"
                if self.gflops_per_task is not None
                else f"budget.total_gflops={self.total_gflops:g} over data.num_tasks={self.num_tasks} tasks"
            )
            raise BudgetError(
                f"{source} gives {per_task:,.6g} GFLOPs per task, less than one training step: "
                f"{self._step_description(datamodule.batch_size)} costs {self.gflops_per_step:,.6g} GFLOPs. Raise the "
                f"budget to at least {self.gflops_per_step * (self.num_tasks or 1):,.6g} GFLOPs in total, or lower "
                f"data.batch_size"
            )
        return steps_for_budget(per_task, self.gflops_per_step, self.rounding)

    def _step_description(self, batch_size: int) -> str:
        cost = self.cost
        assert cost is not None
        multiplied = f" x multiplier {self.multiplier:g}" if self.multiplier != 1 else ""
        return (
            f"one step of {cost.model_name} ({cost.image_size[0]} px, context {cost.context_length}) at global batch "
            f"{batch_size}{multiplied}"
        )

    def _describe(self) -> str:
        assert self.cost is not None
        return (
            f"{self.budget_per_task():,.6g} GFLOPs per task / {self.gflops_per_step:,.6g} GFLOPs per step of "
            f"{self.cost.model_name} at batch {self.cost.batch_size}"
        )

    # ---------------------------------------------------------------- training

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.cost is None:
            return
        task = trainer.current_epoch
        if self.task != task:  # a new task; a run resumed inside a task keeps its restored counters
            self.task, self.task_steps, self.task_gflops = task, 0, 0.0
        if self._checked_task != task:
            self._check_loader(trainer, task)
            self._checked_task = task

    def _check_loader(self, trainer: L.Trainer, task: int) -> None:
        """All ranks agree that task `task`'s loader is exactly its budget before anyone trains on it."""
        if not self.active:
            return
        planned = trainer.num_training_batches
        limited = trainer.fast_dev_run or trainer.limit_train_batches not in (None, 1.0)
        fits = planned == self.steps_per_task or (limited and planned < self.steps_per_task)
        if not trainer.strategy.reduce_boolean_decision(bool(fits), all=True):
            raise RuntimeError(
                f"task {task}: the training loader has {planned} batches on rank {trainer.global_rank} but the "
                f"compute budget allows {self.steps_per_task} steps per task; the data module must build loaders of "
                f"data.steps_per_task batches on every rank"
            )
        if planned < self.steps_per_task:
            rank_zero_warn(
                f"task {task} trains {planned} of its {self.steps_per_task} budgeted steps "
                f"(trainer.fast_dev_run / limit_train_batches)"
            )

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.cost is None:
            return
        self.task_steps += 1
        self.steps += 1
        self.task_gflops += self.gflops_per_step
        self.gflops += self.gflops_per_step
        if reaches_logger(trainer):
            pl_module.log("budget/gflops", self.gflops, on_step=True, on_epoch=False)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cost is None:
            return
        # Equal on every rank; the mean over ranks only keeps Lightning from warning about unsynchronised epoch logs.
        pl_module.log("budget/gflops_task", self.task_gflops, on_step=False, on_epoch=True, sync_dist=True)
        if self.active and self.task_steps != self.steps_per_task and not trainer.fast_dev_run:
            rank_zero_warn(
                f"task {self.task} ended after {self.task_steps} of its {self.steps_per_task} budgeted steps "
                f"({self.task_gflops:,.6g} of {self.budget_per_task():,.6g} GFLOPs)"
            )

    # ---------------------------------------------------------------- results.json

    def task_record(self, trainer: L.Trainer) -> dict[str, Any]:
        """Fields of the results point after a task (TaskResults): GFLOPs spent so far, in this task, its steps."""
        if self.cost is None:
            return {}
        if trainer.sanity_checking:  # the zero-shot point, before any training (also when resuming)
            return {"gflops": 0.0, "gflops_task": 0.0, "steps": 0}
        return {"gflops": self.gflops, "gflops_task": self.task_gflops, "steps": self.task_steps}

    def run_record(self, trainer: L.Trainer) -> dict[str, Any]:
        """The run header's `budget` entry (TaskResults)."""
        if self.cost is None:
            return {}
        cost = self.cost
        steps = self.steps_per_task
        return {
            "budget": {
                "total_gflops": self.total_gflops,
                "gflops_per_task": self.budget_per_task() if self.active else None,
                "multiplier": self.multiplier,
                "attention": self.attention,
                "rounding": self.rounding,
                "model_name": cost.model_name,
                "batch_size": cost.batch_size,
                "image_size": list(cost.image_size),
                "context_length": cost.context_length,
                "gflops_per_step": self.gflops_per_step,
                "gflops_per_sample": self.gflops_per_step / cost.batch_size,
                "steps_per_task": steps,
                "planned_gflops": None if steps is None else steps * self.gflops_per_step * (self.num_tasks or 0),
            }
        }

    # ---------------------------------------------------------------- checkpoint

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_per_task": self.steps_per_task,
            "gflops_per_step": self.gflops_per_step if self.cost is not None else None,
            "task": self.task,
            "task_steps": self.task_steps,
            "task_gflops": self.task_gflops,
            "steps": self.steps,
            "gflops": self.gflops,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("steps_per_task")
        if self.active and saved is not None and self.steps_per_task is not None and saved != self.steps_per_task:
            raise BudgetError(
                f"the checkpoint was trained with {saved} steps per task, but this configuration's compute budget "
                f"gives {self.steps_per_task} ({self._describe()}); resume with the budget, model and batch size "
                f"the run started with"
            )
        self.task = int(state_dict["task"])
        self.task_steps = int(state_dict["task_steps"])
        self.task_gflops = float(state_dict["task_gflops"])
        self.steps = int(state_dict["steps"])
        self.gflops = float(state_dict["gflops"])
