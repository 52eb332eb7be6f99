"""StreamCheckpoint: one `last.ckpt` that is never more than N steps or one task boundary old.

A thin ModelCheckpoint: `last.ckpt` every `every_n_train_steps` steps, and at the end of every task after its
evaluation (`on_train_epoch_end`, the point from which Lightning resumes cleanly into the next task). A step save
that would fall on a task's last batch is left to the task-end save: Lightning resumes a checkpoint taken on the last
batch by skipping that task's validation, and the point would be lost from the results.
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
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
