"""SkippedSamples: how many samples a run skipped because they do not decode, where they are, and when to stop.

    timelit fit --config quickstart.yaml --skipped.limit 100       stop once more than 100 samples were skipped

With `data.on_corrupt: skip` a damaged sample is left out of its batch and listed in it (timelit.data.skips). This
callback, in the main process of every rank, keeps the run's ledger of those samples, per dataset split and shard,
and reports it:

- the log: one warning per damaged sample when first met, one per damaged shard ("shard X is empty", "shard X
  ends at byte N of M") however many samples it lost, and a summary at the end of fit, validate and test;
- TensorBoard: `skipped/total` and `skipped/<DATASET>/<split>` at every step that reaches the logger and at the end
  of every task (x-axis: global step);
- results.json: `skipped` per point (samples per dataset split so far) and at the top level (with the shards);
  each evaluation figure also has its own `skipped` beside `n` (timelit.training.evaluation.evaluator).

Counts are of distinct samples (a damaged replay sample drawn ten times is one). Under DDP each rank sees the
samples of its own batches; at the end of every task the ranks pool their ledgers (one all_gather of the positions),
so the task-end figures, results.json and the limit see every rank's; a step's figure between two task ends is
rank 0's own. The ledger is in this callback's checkpoint state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from timelit.data.skips import Skip, SkipLedger
from timelit.training.lightning_internals import reaches_logger

log = logging.getLogger(__name__)


class TooManySkipped(RuntimeError):
    """More samples were skipped than `skipped.limit` allows."""


class SkippedSamples(Callback):
    """Counts, logs and reports the samples the loaders skipped (see the module docstring).

    Args:
        limit: stop the run (with an error naming the damaged splits and shards) once more than this many distinct
            samples were skipped; null: never. A few damaged files are noise; thousands mean a broken data root,
            and training on without them changes what the run measures.
    """

    def __init__(self, limit: int | None = None):
        if limit is not None and limit < 0:
            raise ValueError(f"skipped.limit must be null or at least 0, got {limit}")
        self.limit = limit
        self.ledger = SkipLedger()
        self._reported_shards: set[tuple[str, str]] = set()

    # ---------------------------------------------------------------- recording

    def _record(self, trainer: L.Trainer, skips: Iterable[Skip]) -> None:
        for skip in skips:
            new = self.ledger.add(skip)
            if skip.shard_problem is not None:
                shard = (skip.split_name, skip.shard)
                if shard not in self._reported_shards:
                    self._reported_shards.add(shard)
                    log.warning("%s: the samples it lost are skipped", skip.shard_problem)
            elif new:
                log.warning("skipping a sample that does not decode: %s", skip.reason)
        if trainer.world_size == 1:  # with several ranks only at a task's end, where every rank checks the same
            self._check_limit()

    def _check_limit(self) -> None:
        if self.limit is not None and len(self.ledger) > self.limit:
            raise TooManySkipped(
                f"{len(self.ledger)} samples were skipped as undecodable, more than skipped.limit {self.limit}: "
                f"{self.ledger.summary()}. Check the data root with `timelit data verify --decode 1`"
            )

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._record(trainer, batch.get("skipped", ()))
        if reaches_logger(trainer):
            self._log_tensorboard(trainer)

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._record(trainer, batch.get("skipped", ()))

    # `timelit test` runs the same evaluation as `timelit validate`, through Lightning's test hooks.
    on_test_batch_end = on_validation_batch_end

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the task's evaluation: its skips are in the ledger too. Every rank gets here.
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, self.ledger.state_dict())
            self.ledger.merge(states)
        self._log_tensorboard(trainer)
        self._check_limit()

    # ---------------------------------------------------------------- reporting

    def _log_tensorboard(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        counts = self.ledger.counts()
        for logger in trainer.loggers:
            writer = getattr(logger, "experiment", None)
            if not hasattr(writer, "add_scalar"):
                continue
            writer.add_scalar("skipped/total", len(self.ledger), global_step=trainer.global_step)
            for name, count in counts.items():
                writer.add_scalar(f"skipped/{name}", count, global_step=trainer.global_step)

    def _summarize(self, trainer: L.Trainer, what: str) -> None:
        if not trainer.is_global_zero:
            return
        if len(self.ledger):
            log.warning("%s skipped %s that do not decode", what, self.ledger.summary())
        else:
            log.info("%s skipped no sample", what)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._summarize(trainer, "the run")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._summarize(trainer, "the evaluation")

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._summarize(trainer, "the evaluation")

    def task_record(self, trainer: L.Trainer) -> dict[str, Any]:
        """Per results.json point: skipped samples per dataset split so far (TaskResults calls this)."""
        return {"skipped": self.ledger.counts()}

    def results_record(self, trainer: L.Trainer) -> dict[str, Any]:
        """results.json's top-level `skipped`: per dataset split, the samples and the shards holding them."""
        return {"skipped": self.ledger.to_dict()}

    # ---------------------------------------------------------------- checkpoint

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state_dict.get("ledger", {}))
