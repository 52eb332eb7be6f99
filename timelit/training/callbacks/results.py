"""TaskResults: what every evaluation found, written where researchers read it.

After each evaluation of the stream (the zero-shot point before task 1, then after every task) it records, per
dataset, the subset figure, then A_KA, A_ZS and GM, plus whatever other callbacks report for that task (GFLOPs spent,
protocol, ...). The records live in this callback's `state_dict`, so they survive a restart, and are rendered to

    <log_dir>/results.json           one entry per point; full-split figures before and after the stream
    <log_dir>/validate_results.json  `timelit validate` / `timelit test` (test_results.json): one evaluation of
                                     the checkpoint's weights, with its scope, A_KA, A_ZS, GM and per-dataset figures
    TensorBoard                      summary/A_KA, summary/A_ZS, summary/GM and eval/<dataset>/<metric>,
                                     x-axis = number of tasks trained (0 = zero-shot); full/... for full splits;
                                     forgetting/bwt, forgetting/avg_forgetting, forgetting/first_half_drop per task
                                     and the forgetting matrix as a Markdown table (text tab) at the end of fit

results.json's `forgetting` section is the forgetting matrix of the points so far
(`timelit.training.evaluation.forgetting`: figure of every adaptation dataset after every task, labelled by `rows` =
tasks done and `columns` = datasets, each dataset's `own_task`, backward transfer, average forgetting and the first-half
drop, and their `history` per task). It needs `run.data.task_datasets`, the datasets each task trains, read from the
data module's stream.

`environments` lists the software and machine that computed the points (versions, git commit, device, torch threads,
precision, world size; timelit.utilities.environment), one entry from the first point and one more from each point
where a resumed run found them changed; validate_results.json has its one `environment`.

A callback contributes fields to a point by defining `task_record(trainer) -> dict`, to the run header by defining
`run_record(trainer) -> dict`, and top-level sections by defining `results_record(trainer) -> dict` (SkippedSamples'
`skipped`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import weakref
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from timelit.training.contracts import (
    EvaluatingModule,
    EvaluationSets,
    ResultsRecordSource,
    RunRecordSource,
    TaskRecordSource,
    TaskStream,
    TrainingBatches,
    callbacks_with,
    datamodule_as,
)
from timelit.training.evaluation.evaluator import summary_figure
from timelit.training.evaluation.forgetting import NUMBERS, ForgettingMatrix, forgetting_matrix
from timelit.training.evaluation.metrics import summarize
from timelit.utilities.atomic import write_text
from timelit.utilities.environment import run_environment

log = logging.getLogger(__name__)
SUMMARY = ("A_KA", "A_ZS", "GM")


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _as_dict(value: Any) -> Any:
    """A dataclass (the data module's Mixture) as a plain dict for the JSON header; other values unchanged."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


# Run directories by trainer, held no longer than the trainer itself (nothing is set on the trainer).
_RUN_DIRECTORIES: weakref.WeakKeyDictionary[Any, Path] = weakref.WeakKeyDictionary()


def run_directory(trainer: L.Trainer) -> Path:
    """The run directory (the logger's log_dir), resolved once per trainer.

    `trainer.log_dir` broadcasts from rank 0, a collective under DDP: every rank must resolve it at the same moment
    (timelit's callbacks do it in `setup`), and code that runs on rank 0 alone then reads the cached value.
    """
    try:
        cached = _RUN_DIRECTORIES.get(trainer)
    except TypeError:  # a stand-in trainer that cannot be weakly referenced (tests): resolved at every call
        return Path(trainer.log_dir or trainer.default_root_dir)
    if cached is None:
        cached = _RUN_DIRECTORIES[trainer] = Path(trainer.log_dir or trainer.default_root_dir)
    return cached


def write_json_atomic(path: Path, data: Any) -> None:
    write_text(path, json.dumps(_clean(data), indent=1, allow_nan=False))


class TaskResults(Callback):
    """Records A_KA / A_ZS / GM and per-dataset figures after every task (see the module docstring).

    Args:
        filename: name of the results file in the run directory.
    """

    def __init__(self, filename: str = "results.json"):
        self.filename = filename
        self.points: list[dict[str, Any]] = []
        self.full: dict[str, dict[str, Any]] = {}
        self.complete = False
        # One entry per change of software or machine over the run's points: a resume on another node, with another
        # torch or thread count, adds one (timelit.utilities.environment says why it matters).
        self.environments: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- recording

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_directory(trainer)  # resolve on every rank now; the writers below run on rank 0 only
        sets = datamodule_as(trainer, EvaluationSets)  # set up before the callbacks
        roles = {spec.role for spec in sets.eval_specs} if sets is not None else set()
        if roles and "eval" not in roles and trainer.is_global_zero:
            log.warning(
                "no held-out datasets (role eval) among the evaluation sets of %s: A_ZS and GM are not measured, and "
                "results report A_KA alone. `timelit data new --held_out quickstart` adds held-out sets "
                "(docs/own_data.md).",
                sets.manifests_spec,  # type: ignore[union-attr]
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the sanity check again when it resumes from a task-end checkpoint: that would evaluate the
        # resumed weights as "zero-shot". The zero-shot point is already in the restored state; skip the check.
        if any(point["tasks_done"] == 0 for point in self.points):
            trainer.num_sanity_val_steps = 0

    @override
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.num_sanity_val_steps != float("inf"):
            rank_zero_warn(
                "trainer.num_sanity_val_steps is not -1: the sanity check will not evaluate whole datasets, so the "
                "zero-shot point (task 0) is not recorded. timelit's configs set it to -1."
            )

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluation = self._take_evaluation(pl_module)
        if evaluation is None:
            return
        if trainer.state.fn != TrainerFn.FITTING:
            self._write_single(trainer, evaluation)
            return
        if trainer.sanity_checking and (
            trainer.num_sanity_val_steps != float("inf") or any(p["tasks_done"] == 0 for p in self.points)
        ):
            return
        tasks_done = 0 if trainer.sanity_checking else trainer.current_epoch + 1
        point = self._point(trainer, evaluation, tasks_done)
        self._note_environment(trainer, tasks_done)
        self.points = [p for p in self.points if p["tasks_done"] != tasks_done] + [point]
        self.points.sort(key=lambda p: p["tasks_done"])
        stream = datamodule_as(trainer, TaskStream)
        where = {0: "start", stream.num_tasks if stream is not None else None: "end"}.get(tasks_done)
        # Lightning reuses the sanity check's (full) loaders for the first task's evaluation: that one is not "end".
        if evaluation["scope"] == "full" and where is not None:
            self.full[where] = {
                "tasks_done": tasks_done,
                **summarize(evaluation["datasets"], "full"),
                "datasets": self._figures(evaluation["datasets"], "full"),
            }
        self._log_tensorboard(trainer, point, evaluation, self._forgetting(trainer))
        self._write(trainer)
        figures = "  ".join(f"{key} {point[key]:.2f}" for key in SUMMARY if key in point)
        log.info("after %d task(s): %s", tasks_done, figures)

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # `timelit test` runs the same evaluation as `timelit validate` through Lightning's test hooks.
        evaluation = self._take_evaluation(pl_module)
        if evaluation is not None:
            self._write_single(trainer, evaluation)

    @staticmethod
    def _take_evaluation(pl_module: L.LightningModule) -> dict[str, Any] | None:
        """The module's latest evaluation, cleared so that no later hook records it a second time."""
        if not isinstance(pl_module, EvaluatingModule) or pl_module.last_evaluation is None:
            return None
        evaluation, pl_module.last_evaluation = pl_module.last_evaluation, None
        return evaluation

    def _point(self, trainer: L.Trainer, evaluation: dict[str, Any], tasks_done: int) -> dict[str, Any]:
        point: dict[str, Any] = {"tasks_done": tasks_done, "global_step": trainer.global_step}
        point.update(summarize(evaluation["datasets"], "subset"))
        point["datasets"] = self._figures(evaluation["datasets"], "subset")
        for callback in callbacks_with(trainer, TaskRecordSource):
            if callback is not self:
                point.update(callback.task_record(trainer))
        return point

    def _note_environment(self, trainer: L.Trainer, tasks_done: int) -> None:
        current = run_environment(trainer)
        last = {k: v for k, v in self.environments[-1].items() if k != "from_tasks_done"} if self.environments else None
        if current != last:
            self.environments.append({"from_tasks_done": tasks_done, **current})

    @staticmethod
    def _figures(datasets: dict[str, Any], scope: str) -> dict[str, Any]:
        return {
            name: {"role": e["role"], "task": e["task"], "figure": summary_figure(e, scope), **e[scope]}
            for name, e in datasets.items()
            if scope in e
        }

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stream = datamodule_as(trainer, TaskStream)
        num_tasks = stream.num_tasks if stream is not None else None
        self.complete = bool(self.points) and self.points[-1]["tasks_done"] == num_tasks
        self._write(trainer)
        self._log_matrix(trainer)

    # ---------------------------------------------------------------- output

    @staticmethod
    def _task_datasets(trainer: L.Trainer) -> list[list[str]] | None:
        stream = datamodule_as(trainer, TaskStream)
        return stream.stream.task_datasets if stream is not None else None

    def _forgetting(self, trainer: L.Trainer) -> ForgettingMatrix | None:
        task_datasets = self._task_datasets(trainer)
        return None if task_datasets is None else forgetting_matrix(self.points, task_datasets)

    def _run_header(self, trainer: L.Trainer) -> dict[str, Any]:
        module, stream = trainer.lightning_module, datamodule_as(trainer, TaskStream)
        batches = datamodule_as(trainer, TrainingBatches)
        header: dict[str, Any] = {"model": dict(module.hparams) if module is not None else {}}
        if stream is not None:
            header["data"] = {
                "stream": stream.stream_spec,
                "num_tasks": stream.num_tasks,
                "batch_size": batches.batch_size if batches is not None else None,
                "steps_per_task": batches.steps_per_task if batches is not None else None,
                "seed": stream.seed,
                # The report groups runs by everything but the seed: with or without replay are two experiments.
                "mixture": _as_dict(stream.mixture),
                "task_datasets": stream.stream.task_datasets,
            }
        for callback in callbacks_with(trainer, RunRecordSource):
            header.update(callback.run_record(trainer))
        return header

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        run_dir = run_directory(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        forgetting = self._forgetting(trainer)
        record = {
            "run": self._run_header(trainer),
            "complete": self.complete,
            "points": self.points,
            "full": self.full,
            "forgetting": None if forgetting is None else forgetting.to_dict(),
            "environments": self.environments,
        }
        for callback in callbacks_with(trainer, ResultsRecordSource):
            record.update(callback.results_record(trainer))
        write_json_atomic(run_dir / self.filename, record)

    @rank_zero_only
    def _write_single(self, trainer: L.Trainer, evaluation: dict[str, Any]) -> None:
        run_dir = run_directory(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        scope = evaluation["scope"]
        record = {
            "scope": scope,
            **summarize(evaluation["datasets"], scope),
            "datasets": self._figures(evaluation["datasets"], scope),
            "environment": run_environment(trainer),
        }
        for callback in callbacks_with(trainer, ResultsRecordSource):
            record.update(callback.results_record(trainer))
        write_json_atomic(run_dir / f"{trainer.state.fn.value}_{self.filename}", record)

    @rank_zero_only
    def _log_tensorboard(
        self,
        trainer: L.Trainer,
        point: dict[str, Any],
        evaluation: dict[str, Any],
        forgetting: ForgettingMatrix | None,
    ) -> None:
        writers = [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_scalar")]
        step = point["tasks_done"]
        for writer in writers:
            for key in SUMMARY:
                if key in point:  # A_ZS and GM only where there are held-out sets
                    writer.add_scalar(f"summary/{key}", point[key], global_step=step)
            if forgetting is not None and step > 0:
                for number in NUMBERS:
                    if not math.isnan(getattr(forgetting, number)):
                        writer.add_scalar(f"forgetting/{number}", getattr(forgetting, number), global_step=step)
            for name, entry in evaluation["datasets"].items():
                for metric, value in entry["subset"].items():
                    if metric not in ("n", "skipped"):  # counts, not figures (SkippedSamples logs the skips)
                        writer.add_scalar(f"eval/{name}/{metric}", value, global_step=step)
            if evaluation["scope"] == "full":
                for key, value in summarize(evaluation["datasets"], "full").items():
                    writer.add_scalar(f"full/{key}", value, global_step=step)
            writer.flush()

    @rank_zero_only
    def _log_matrix(self, trainer: L.Trainer) -> None:
        """The whole matrix once, at the end of fit: as text, so TensorBoard needs no image of it."""
        forgetting = self._forgetting(trainer)
        if forgetting is None or not self.points:
            return
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("forgetting/matrix", forgetting.markdown(), global_step=forgetting.last)
                logger.experiment.flush()

    # ---------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points, "full": self.full, "complete": self.complete, "environments": self.environments}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = list(state_dict.get("points", []))
        self.full = dict(state_dict.get("full", {}))
        self.complete = bool(state_dict.get("complete", False))
        self.environments = list(state_dict.get("environments", []))
