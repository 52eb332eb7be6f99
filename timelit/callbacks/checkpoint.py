"""StreamCheckpoint: one `last.ckpt` that is never more than N steps or one task boundary old.

A thin ModelCheckpoint: `last.ckpt` every `every_n_train_steps` steps, and at the end of every task after its
evaluation (`on_train_epoch_end`, the point from which Lightning resumes cleanly into the next task). No checkpoint
is ever taken on a task's last batch or during an evaluation: Lightning resumes the first by skipping that task's
evaluation (its point would be lost from the results) and the second by finishing the evaluation on part of the
data. The steps between the previous `last.ckpt` and such a moment are recomputed exactly on resume.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class StreamCheckpoint(ModelCheckpoint):
    """Keeps `<run dir>/checkpoints/last.ckpt` current; resume with `--ckpt_path last` (the CLI's default).

    Args:
        every_n_train_steps: save within a task every this many optimizer steps.
        dirpath: where `last.ckpt` goes; default `<log_dir>/checkpoints`.
        save_on_exception: also save when training stops on an exception (e.g. SIGTERM from Slurm).
    """

    def __init__(self, every_n_train_steps: int = 500, dirpath: str | None = None, save_on_exception: bool = True):
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            save_on_exception=save_on_exception,
            enable_version_counter=False,
        )

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 < trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save `last.ckpt` when training stops on an exception inside a task's training steps.

        Not during an evaluation (a resume would finish it on part of the data) nor on a task's last batch (Lightning
        would resume past that task's evaluation): there the previous `last.ckpt` is the right place to resume from,
        and the steps since are recomputed exactly. Unlike ModelCheckpoint, no extra named checkpoint is written.
        """
        in_training = trainer.training and not trainer.validating and not trainer.sanity_checking
        on_last_batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches
        if self._should_save_on_exception(trainer) and in_training and not on_last_batch:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
