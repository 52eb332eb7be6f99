"""Preemption: when Slurm (or anyone) signals that the job must end, save `last.ckpt`, requeue, and stop.

    sbatch --signal=SIGUSR1@300 --requeue slurm/train.sbatch ...     a run near its time limit saves and requeues
    kill -TERM <pid of timelit fit>                                   saves last.ckpt, exits with status 143

The signal handlers only record which signal arrived (I/O or a collective inside a handler can hang DDP, PL#21406),
and Lightning's own handlers are kept off for the fit (timelit.training.lightning_internals). At the end of every
training batch, and at the end of every task after its task-end checkpoint, the ranks agree on what arrived with one MAX
all-reduce; then every rank saves `last.ckpt` through the run's StreamCheckpoint, rank 0 runs `scontrol requeue`
after the requeue signal under Slurm (not after SIGTERM), and every rank raises `Preempted` (exit status 128 + the
signal number). A signal during an evaluation takes effect after that task's checkpoint; after the last training
step the run finishes normally. This callback is a `Checkpoint`, so Lightning runs its hooks after every other
callback's. docs/ARCHITECTURE.md ("Preemption", decision 4) has the reasons and every case.

The checkpoint holds nothing of this callback: what it saves is the trainer's own state.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from typing_extensions import override

from timelit.training import lightning_internals
from timelit.utilities import early_signals

log = logging.getLogger(__name__)

RequeueSignal = Literal["SIGUSR1", "SIGUSR2"]
_SCONTROL_TIMEOUT_S = 60


class Preempted(SystemExit):
    """Raised on every rank once the preemption checkpoint is written: the process exits with 128 + signal number."""

    def __init__(self, signum: int, checkpoint: str | None, requeued: str | None):
        super().__init__(128 + signum)
        self.signum, self.checkpoint, self.requeued = signum, checkpoint, requeued


def slurm_job_to_requeue(environ: Mapping[str, str] | None = None) -> str | None:
    """The id `scontrol requeue` needs: `<array job>_<task>` for an array task, the job id otherwise, None outside
    Slurm. Requeueing the bare `SLURM_JOB_ID` of an array task works too, but the array form is what `squeue` shows."""
    env = os.environ if environ is None else environ
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str) -> bool:
    """`scontrol requeue JOB_ID`; False (and an error in the log) when it fails or scontrol is missing, as in
    containers without the Slurm client (PL#21404)."""
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=_SCONTROL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("could not requeue Slurm job %s (%s); submit the same command again to resume", job_id, error)
        return False
    if result.returncode != 0:
        log.error(
            "`scontrol requeue %s` failed with status %d: %s; submit the same command again to resume",
            job_id,
            result.returncode,
            result.stderr.strip(),
        )
        return False
    return True


class Preemption(Checkpoint):
    """Saves `last.ckpt` and stops when SIGTERM or the requeue signal arrives; requeues the Slurm job after the latter.

    See the module docstring for when the signal takes effect. Needs a ModelCheckpoint with `save_last` (timelit's
    `checkpoint:` section); only the first Preemption callback of a trainer acts.

    Args:
        requeue: run `scontrol requeue` (rank 0) after the requeue signal when the run is a Slurm job.
        requeue_signal: the signal `sbatch --signal=<signal>@<seconds>` sends before the time limit (submitit uses
            SIGUSR2).
    """

    def __init__(self, requeue: bool = True, requeue_signal: RequeueSignal = "SIGUSR1"):
        self.requeue = requeue
        self.requeue_signal = requeue_signal
        self._received: set[int] = set()
        self._previous: dict[int, Any] = {}
        self._active = False
        self._checkpoints: list[ModelCheckpoint] = []

    @property
    def signals(self) -> tuple[int, int]:
        """(stop signal, requeue signal) as numbers."""
        return int(signal.SIGTERM), int(getattr(signal, self.requeue_signal))

    # ------------------------------------------------------------------ handlers

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only a flag: no logging, no I/O, no collective (PL#21406). Acted on at the next batch end.
        self._received.add(signum)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("Preemption: not in the main thread, so no signal handlers; SIGTERM/SIGUSR1 will not save")
            return
        for signum in self.signals:
            if signal.getsignal(signum) != self._on_signal:
                previous = signal.signal(signum, self._on_signal)
                self._previous.setdefault(signum, previous)

    def _restore_handlers(self, trainer: L.Trainer) -> None:
        # Where Lightning did register its handlers, it recorded this callback's as the ones to restore; after an
        # exception it restores them *after* `on_exception`, so its record is corrected too.
        for signum, previous in self._previous.items():
            previous = previous if previous is not None else signal.SIG_DFL
            if threading.current_thread() is threading.main_thread():
                signal.signal(signum, previous)
            lightning_internals.replace_recorded_handler(trainer, signum, self._on_signal, previous)
        self._previous = {}

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        first = next(cb for cb in trainer.callbacks if isinstance(cb, Preemption))  # type: ignore[attr-defined]
        if first is not self:
            log.debug("a second Preemption callback is inert; the first one handles the signals")
            return
        self._checkpoints = [
            cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last
        ]
        if not self._checkpoints:
            raise ValueError(
                "the Preemption callback needs a ModelCheckpoint with save_last=True to write last.ckpt: keep "
                "timelit's `checkpoint:` section (StreamCheckpoint) in the config"
            )
        self._turn_off_lightning_requeue(trainer)
        self._received = set()
        self._active = True
        # A requeue signal that came while `timelit fit` was starting up (timelit.utilities.early_signals) counts as
        # received.
        arrived_early = early_signals.take(self.signals[1])
        # Installed now, and Lightning is kept from wrapping SIGTERM at the start of the run (which it would do
        # after `setup`, leaving its broadcasting handler live until on_sanity_check_start / on_train_start).
        self._install_handlers()
        if arrived_early:
            self._received.add(self.signals[1])
            log.warning("%s arrived while the run was starting: it stops at the first batch", self.requeue_signal)
        self._keep_lightning_handlers_off(trainer)

    @staticmethod
    def _keep_lightning_handlers_off(trainer: L.Trainer) -> None:
        """Keep Lightning from installing its signal handlers in this fit (timelit.training.lightning_internals).

        Lightning would install them after `setup`, just before the run, wrapping SIGTERM in a handler that
        broadcasts inside the handler (PL#21406); until `on_sanity_check_start` / `on_train_start` took SIGTERM back,
        a SIGTERM to one rank could hang DDP in that window (the run's barrier, building the first task's loader on a
        resume). Undone at `teardown` / `on_exception`, so a later `validate` on the same trainer is Lightning's."""
        if not lightning_internals.keep_signal_handlers_off(trainer):
            log.debug("Preemption: this Lightning has no signal connector to keep off; handlers retaken at start")

    @staticmethod
    def _turn_off_lightning_requeue(trainer: L.Trainer) -> None:
        """Lightning's SLURM auto-requeue saves and requeues inside its signal handler; this callback replaces it.
        Configs should say so (`trainer.plugins: SLURMEnvironment(auto_requeue=false)`); this makes sure."""
        from lightning.fabric.plugins.environments import SLURMEnvironment

        environment = lightning_internals.cluster_environment(trainer)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            log.info("Preemption handles the Slurm signals: Lightning's SLURM auto-requeue is turned off")
            environment.auto_requeue = False

    @override
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A no-op when Lightning was kept off the signals at `setup`; takes them back where it could not be.
        if self._active:
            self._install_handlers()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._install_handlers()
        if trainer.global_step > 0 and trainer.is_global_zero:
            log.info(
                "resumed at step %d (task %d) from %s", trainer.global_step, trainer.current_epoch, trainer.ckpt_path
            )

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or batch_idx + 1 >= trainer.num_training_batches:
            return  # a task's last batch: its evaluation and task-end checkpoint come first (on_train_epoch_end)
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return  # gradients being accumulated are in no checkpoint
        stop, requeue = self.agree(trainer)
        if stop or requeue:
            self._stop(
                trainer,
                self.signals[1] if requeue else self.signals[0],
                f"batch {batch_idx + 1} of {trainer.num_training_batches}",
            )

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Act on a signal that arrived during the task's last batch or its evaluation, right after the task-end
        checkpoint (this callback is a Checkpoint: it runs after StreamCheckpoint's save at this point, or makes the
        same save itself). Without this, a requeue signal that came during a long evaluation would wait for the next
        task's first batch, possibly past the time limit. Every rank reaches this hook, so the ranks agree as at a
        batch end. After the last task nothing is left to resume: the run finishes."""
        if not self._active or trainer.sanity_checking or self._stream_ends_here(trainer):
            return
        stop, requeue = self.agree(trainer)
        if stop or requeue:
            self._stop(trainer, self.signals[1] if requeue else self.signals[0], "after its evaluation")

    @staticmethod
    def _stream_ends_here(trainer: L.Trainer) -> bool:
        """True at the end of the last task (or when the trainer stops after this epoch anyway)."""
        last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
        out_of_steps = 0 <= trainer.max_steps <= trainer.global_step
        return last_epoch or out_of_steps or trainer.should_stop

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls `teardown` after a fit that ran to its end (an exception goes to `on_exception` instead).
        if not self._active:
            return
        self._active = False
        self._restore_handlers(trainer)
        lightning_internals.let_signal_handlers_back(trainer)
        if self._received:
            names = ", ".join(signal.Signals(s).name for s in sorted(self._received))
            log.warning("%s arrived after the last training step: the run finished normally", names)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._active:
            self._active = False
            self._restore_handlers(trainer)
            lightning_internals.let_signal_handlers_back(trainer)

    # ------------------------------------------------------------------ acting

    def agree(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """(some rank saw SIGTERM, some rank saw the requeue signal): one MAX all-reduce, called by every rank."""
        stop_signal, requeue_signal = self.signals
        if trainer.world_size == 1:
            # Nothing to agree on, and no device tensor: reading one back would make the host wait for the GPU at
            # every step.
            return stop_signal in self._received, requeue_signal in self._received
        flags = torch.tensor(
            [stop_signal in self._received, requeue_signal in self._received],
            dtype=torch.int32,
            device=trainer.strategy.root_device,
        )
        flags = trainer.strategy.reduce(flags, reduce_op="max")
        stop, requeue = (bool(v) for v in flags.tolist())
        return stop, requeue

    def _save(self, trainer: L.Trainer) -> str | None:
        """last.ckpt of this step through each save_last ModelCheckpoint (every rank calls; rank 0 writes)."""
        for callback in self._checkpoints:
            # The periodic save may have run at this very step (checkpoint callbacks before this one).
            saved = lightning_internals.last_saved_step(callback) == trainer.global_step
            if not (saved and callback.last_model_path):
                lightning_internals.save_last_checkpoint(callback, trainer)
        return self._checkpoints[0].last_model_path or None

    def _stop(self, trainer: L.Trainer, signum: int, where: str) -> None:
        path = self._save(trainer)
        for logger in trainer.loggers:
            logger.save()  # flushed now: the SIGTERM that follows a requeue may end the process mid-teardown
        requeued = None
        if signum == self.signals[1] and self.requeue and trainer.is_global_zero:
            job = slurm_job_to_requeue()
            if job is None:
                log.info("%s: not a Slurm job, so not requeued", signal.Signals(signum).name)
            elif requeue_slurm_job(job):
                requeued = job
        # No rank leaves before rank 0 has requeued: `srun --kill-on-bad-exit` would end rank 0 with the first exit.
        trainer.strategy.barrier("timelit-preemption")
        if trainer.is_global_zero:
            log.warning(
                "%s: stopped at step %d (task %d, %s); saved %s%s",
                signal.Signals(signum).name,
                trainer.global_step,
                trainer.current_epoch,
                where,
                path,
                f"; requeued Slurm job {requeued}" if requeued else "; run the same command again to resume",
            )
        raise Preempted(signum, path, requeued)
