"""What the parts of a run promise each other.

The LightningModule, the DataModule and the callbacks meet only through the trainer. Each Protocol below names what
one of them reads from another, so a component checks its contract once (``isinstance`` on a runtime-checkable
Protocol, or the accessor functions here) and then uses typed attributes, instead of probing with getattr/hasattr
wherever it happens to need a value. A component that does not satisfy a contract is *absent* for that purpose (a
plain DataModule in a test has no task stream; a callback without records contributes none) — never half-read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import lightning as L

__all__ = [
    "CheckpointFolder",
    "EvaluatingModule",
    "EvaluationSets",
    "ExpertStoreOwner",
    "ExpertWeightsSource",
    "ResultsRecordSource",
    "RunRecordSource",
    "TaskRecordSource",
    "TaskStream",
    "TrainingBatches",
    "ZeroShotModule",
    "callbacks_with",
    "datamodule_as",
]

T = TypeVar("T")


class _Stream(Protocol):
    task_datasets: list[list[str]]


@runtime_checkable
class TaskStream(Protocol):
    """The DataModule's stream of tasks (`timelit.data.TimeDataModule` provides it, once set up)."""

    num_tasks: int
    stream: _Stream  # the concepts of every task; `task_datasets` lists each task's datasets
    stream_spec: str  # the stream as configured (a name or a file), for the run header
    seed: int
    mixture: Any  # the per-batch mixture of pretraining, current and replay data


@runtime_checkable
class EvaluationSets(Protocol):
    """The DataModule's evaluation sets (one `timelit.data.EvalSpec` each), set up before the callbacks' setup."""

    eval_specs: Sequence[Any]
    manifests_spec: str


@runtime_checkable
class TrainingBatches(Protocol):
    """The DataModule's training batches: their global size and how many a task has.

    `steps_per_task` is the one value written from outside: `ComputeBudget` derives it from the FLOP budget in
    `setup`, before the first training loader is built, through `set_steps_per_task`.
    """

    batch_size: int
    steps_per_task: int | None

    def require_steps(self) -> int: ...

    def set_steps_per_task(self, steps: int) -> None: ...


@runtime_checkable
class ZeroShotModule(Protocol):
    """The LightningModule's θ0, which TimeMerge merges against (`timelit.training.model.CLIPFineTuner` provides it)."""

    # θ0, captured in setup before any checkpoint is restored; None before setup.
    zero_shot_weights: dict[str, Any] | None


@runtime_checkable
class EvaluatingModule(ZeroShotModule, Protocol):
    """The LightningModule as the callbacks read it (`timelit.training.model.CLIPFineTuner` provides it)."""

    # The figures of the evaluation just run ({"scope", "datasets"}); the results callback takes and clears them.
    last_evaluation: dict[str, Any] | None


@runtime_checkable
class TaskRecordSource(Protocol):
    """A callback that adds figures to every point of results.json (e.g. GFLOPs spent, samples skipped)."""

    def task_record(self, trainer: L.Trainer) -> dict[str, Any]: ...


@runtime_checkable
class RunRecordSource(Protocol):
    """A callback that adds to the run header of results.json (e.g. the protocol, the budget)."""

    def run_record(self, trainer: L.Trainer) -> dict[str, Any]: ...


@runtime_checkable
class ResultsRecordSource(Protocol):
    """A callback that adds top-level entries to results.json (e.g. the skipped-sample totals)."""

    def results_record(self, trainer: L.Trainer) -> dict[str, Any]: ...


@runtime_checkable
class ExpertStoreOwner(Protocol):
    """A callback that keeps files in a folder of the run besides the checkpoints (TimeMerge's expert store)."""

    def store_directory(self, run_dir: Path) -> Path: ...


@runtime_checkable
class ExpertWeightsSource(Protocol):
    """A callback whose weights are the task's expert instead of the live ones
    (`timelit.training.callbacks.ema.StepEMA`): TimeMerge stores what the first such callback returns."""

    def averaged_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]: ...


@runtime_checkable
class CheckpointFolder(Protocol):
    """The trainer's checkpoint callback as TimeMerge reads it: the folder of last.ckpt, whose size a boundary
    reserves (`timelit.training.callbacks.checkpoint.StreamCheckpoint`, a ModelCheckpoint, provides it)."""

    dirpath: str | Path | None


def datamodule_as(trainer: L.Trainer, contract: type[T]) -> T | None:
    """The trainer's DataModule if it satisfies `contract`, else None."""
    datamodule = trainer.datamodule
    return datamodule if isinstance(datamodule, contract) else None


def callbacks_with(trainer: L.Trainer, contract: type[T]) -> Iterator[T]:
    """The trainer's callbacks that satisfy `contract`, in their order."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, contract):
            yield callback
