"""StreamCheckpoint: one `last.ckpt` that is never more than N steps or one task boundary old, written atomically.

    timelit fit --config quickstart.yaml --checkpoint.every_n_train_steps 50      runs/quickstart/checkpoints/last.ckpt

A thin ModelCheckpoint: `last.ckpt` every `every_n_train_steps` steps, and at the end of every task after its
evaluation (`on_train_epoch_end`, the point from which Lightning resumes cleanly into the next task). No checkpoint
is ever taken on a task's last batch or during an evaluation: Lightning resumes the first by skipping that task's
evaluation (its point would be lost from the results) and the second by finishing the evaluation on part of the
data. The steps between the previous `last.ckpt` and such a moment are recomputed exactly on resume.

`AtomicCheckpointIO` (installed by `timelit fit`) writes every checkpoint file beside its destination and renames it
into place, because `last.ckpt` is the only checkpoint a run keeps (`save_top_k=0`): a half-written one would leave
nothing to resume from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from timelit.training import lightning_internals
from timelit.utilities.atomic import remove_temporaries, replace_with, temporary_path
from timelit.utilities.disk_space import is_disk_full, write_error
from timelit.utilities.errors import UnreadableFileError, reading_checkpoint

log = logging.getLogger(__name__)
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"  # in every checkpoint Lightning writes; it reads it first


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic on any filesystem: `torch.save` into a hidden temporary file in
    the destination's folder, fsync, `os.replace` over the destination.

    Lightning's own save (`lightning.fabric.utilities.cloud_io._atomic_save`) serialises the whole checkpoint into
    memory, writes it to a temporary file in `$TMPDIR` and `shutil.move`s it. On a cluster `$TMPDIR` is usually
    node-local while the run directory is on a shared filesystem: the rename fails (EXDEV) and `shutil.move` copies
    into `last.ckpt` in place, so a SIGKILL during the copy (Slurm's, `KillWait` after SIGTERM) leaves a truncated
    `last.ckpt` and no older one to fall back on. Here the bytes go straight to the destination's filesystem (no copy
    of the checkpoint in RAM or in `$TMPDIR`), and the rename within one folder is atomic: readers see the old file or
    the new one. A save killed midway leaves only `.<name>.<host>.<pid>.tmp`, which no `last*.ckpt` glob matches; the
    next successful save on the same host removes such leftovers of processes that no longer exist.

    Loading and `remove_checkpoint` are TorchCheckpointIO's, except that a file which is not a Lightning checkpoint
    ends in a one-line user error. Paths on remote filesystems (`s3://...`) are saved by TorchCheckpointIO as before
    (object stores have no partial objects).
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(fs._strip_protocol(str(path)))
        tmp = temporary_path(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # A Python file rather than a path: torch's own file writer turns a full disk into
            # "basic_ios::clear: iostream error"; through Python's write() the OSError and its errno survive (as the
            # context of torch's RuntimeError), so the error can name the file and the cause.
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
            replace_with(tmp, target)
        except Exception as error:
            cause = next((e for e in _chain(error) if isinstance(e, OSError)), None)
            if cause is None:
                raise
            raise write_error(target, cause) from error
        finally:
            tmp.unlink(missing_ok=True)
        # Leftovers of saves killed midway on this host (a checkpoint-sized file each); other hosts' pids mean
        # nothing here. A run also removes every leftover of its folders when it starts (timelit.utilities.atomic).
        remove_temporaries([target.parent], only_gone_writers=True)

    @override
    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """TorchCheckpointIO's load; a file that is not a Lightning checkpoint or is cut short (a `--ckpt_path` to the
        wrong file) is a user error naming it, not torch's several lines of advice or a KeyError under a traceback."""
        with reading_checkpoint(path):
            checkpoint = super().load_checkpoint(path, *args, **kwargs)  # its map_location default keeps tensors on CPU
        if not isinstance(checkpoint, dict) or LIGHTNING_VERSION_KEY not in checkpoint:  # Lightning's KeyError else
            raise UnreadableFileError(
                f"{path}: not a Lightning checkpoint (no {LIGHTNING_VERSION_KEY!r}); weights alone go in "
                "--model.init_args.pretrained"
            )
        return checkpoint


class StreamCheckpoint(ModelCheckpoint):
    """Keeps `<run dir>/checkpoints/last.ckpt` current; resume with `--ckpt_path last` (the CLI's default).

    Args:
        every_n_train_steps: save within a task every this many optimizer steps.
        dirpath: where `last.ckpt` goes; default `<log_dir>/checkpoints`.
        save_on_exception: also save when a single-process run stops on an exception in a task's training steps
            (with several ranks it never does; see `on_exception`).
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
        self._failed_save: BaseException | None = None

    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Every save of this callback comes through here (periodic, task-end, Preemption's, on an exception). A
        # private method of ModelCheckpoint: tests/unit/test_lightning_internals.py checks that Lightning still
        # saves through it (timelit.training.lightning_internals).
        try:
            super()._save_checkpoint(trainer, filepath)
        except BaseException as error:
            self._failed_save = error  # `on_exception` must not write into the disk that just refused this one
            raise

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 < trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save `last.ckpt` when a single-process run stops on an exception inside a task's training steps.

        Not during an evaluation (a resume would finish it on part of the data) nor on a task's last batch (Lightning
        would resume past that task's evaluation): there the previous `last.ckpt` is the right place to resume from,
        and the steps since are recomputed exactly. Unlike ModelCheckpoint, no extra named checkpoint is written.

        Never with more than one rank: an exception is usually one rank's own (an error in its data, a CUDA fault),
        and a save ends in a barrier that the other ranks, waiting in the step's all-reduce, never reach, so the job
        would hang until the collective's timeout instead of failing. The preemption stop, which every rank agrees on,
        saves through `Preemption` before it raises.

        Never when the exception is this callback's own failed save or a full disk (ENOSPC, EDQUOT): a second save
        into the disk that just refused one fails the same way, and the previous `last.ckpt` (written atomically) is
        still there. A save here that fails is logged, not raised: an exception out of this hook would replace the
        run's own and cut Lightning's error path short before the data module stops its loader workers, and the
        process would hang at exit (issue 20).
        """
        failed_save, self._failed_save = self._failed_save, None
        if not lightning_internals.should_save_on_exception(self, trainer):
            return
        if trainer.world_size > 1:
            # Logged by the rank that failed: the others do not get here while they wait in a collective.
            log.warning(
                "rank %d: %s; last.ckpt is not saved on an exception with %d ranks (the others may be inside a "
                "collective), so a resume starts from the previous last.ckpt",
                trainer.global_rank,
                type(exception).__name__,
                trainer.world_size,
            )
            return
        if any(error is failed_save or is_disk_full(error) for error in _chain(exception)):
            log.error("last.ckpt is not saved again after %s: a resume starts from the previous one", exception)
            return
        in_training = trainer.training and not trainer.validating and not trainer.sanity_checking
        on_last_batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches
        if in_training and not on_last_batch:
            try:
                lightning_internals.save_last_checkpoint(self, trainer)
            except Exception as error:
                log.error("last.ckpt could not be saved after %s: %s", type(exception).__name__, error)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        lightning_internals.save_last_checkpoint(self, trainer)


def _chain(exception: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from or during (`__cause__`, `__context__`)."""
    seen: set[int] = set()
    current: BaseException | None = exception
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
