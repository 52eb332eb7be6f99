"""Every use timelit makes of Lightning's private API, in one place (issue 19, item 5).

Lightning has no public hook for what these functions do. Each says what it reaches and why timelit needs it;
tests/unit/test_lightning_internals.py fails when a Lightning release renames or removes any of them, so an upgrade
breaks a test here instead of changing a run silently. Everywhere else timelit uses Lightning's public API only.

    reaches_logger(trainer)                   does a value logged with on_step=True now reach the logger?
    keep_signal_handlers_off(trainer)         Lightning installs no signal handler during this fit (Preemption)
    let_signal_handlers_back(trainer)         ... until this is called
    replace_recorded_handler(trainer, ...)    correct the handler Lightning will restore after an exception
    cluster_environment(trainer)              the ClusterEnvironment whose `auto_requeue` Lightning's handler reads
    save_last_checkpoint(callback, trainer)   a ModelCheckpoint writes its last.ckpt now
    last_saved_step(callback)                 the global step of a ModelCheckpoint's latest save
    should_save_on_exception(callback, ...)   ModelCheckpoint's own test for a save on an exception
    subcommand_parser(cli, "fit")             the parser of one LightningCLI subcommand

Private names used by subclassing, not through a function here: `StreamCheckpoint` overrides
`ModelCheckpoint._save_checkpoint` (every save of the callback passes through it), and the test above checks that it
still does; `TimeLightningCLI` overrides `LightningCLI._parse_ckpt_path` (its first `torch.load` of `--ckpt_path`), to
report a file that is no checkpoint in one line, which tests/integration/test_first_contact.py checks.
"""

from __future__ import annotations

import signal
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def reaches_logger(trainer: L.Trainer) -> bool:
    """Whether a value logged now with `on_step=True` reaches the logger.

    Lightning writes step-level values only every `trainer.log_every_n_steps` steps and drops the others, but each
    `LightningModule.log` call still costs its bookkeeping (0.1-0.5 ms on a CPU), so timelit logs the scalars it does
    not need on the progress bar only at the steps that reach the logger. Lightning keeps that decision in
    `trainer._logger_connector.should_update_logs`; if it moves, every step logs again (correct, only slower).
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def keep_signal_handlers_off(trainer: L.Trainer) -> bool:
    """Make this fit's `trainer._signal_connector.register_signal_handlers()` install nothing; False where this
    Lightning has no such connector.

    Lightning calls it after the callbacks' `setup`, just before the run; in a fit it would wrap SIGTERM in a handler
    that broadcasts inside the handler (Lightning-AI/pytorch-lightning#21406) and forwards the signal to launched
    children, and under Slurm with `auto_requeue` save and requeue inside the SIGUSR1 handler. With it never
    installed, `trainer.received_sigterm` stays False and timelit's Preemption handlers stay in place from `setup` to
    `teardown`. Lightning then records no handlers to restore (`_original_handlers`).
    """
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not callable(getattr(connector, "register_signal_handlers", None)):
        return False

    def register_nothing() -> None:
        connector.received_sigterm = False
        connector._original_handlers = {}

    connector.register_signal_handlers = register_nothing
    return True


def let_signal_handlers_back(trainer: L.Trainer) -> None:
    """Undo `keep_signal_handlers_off`: a later `validate` on the same trainer gets Lightning's handlers again."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None:
        vars(connector).pop("register_signal_handlers", None)


def replace_recorded_handler(trainer: L.Trainer, signum: int, ours: Any, previous: Any) -> None:
    """Where Lightning recorded `ours` as the handler of `signum` to restore at its teardown, record `previous`.

    Needed where Lightning did register its handlers (`keep_signal_handlers_off` found no connector to keep off, or
    a run that began before it): after an exception Lightning restores its record *after* the callbacks'
    `on_exception`, which would put a finished callback's handler back.
    """
    recorded = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
    if isinstance(recorded, dict) and recorded.get(signum) == ours:
        recorded[signum] = previous if previous is not None else signal.SIG_DFL


def cluster_environment(trainer: L.Trainer) -> Any:
    """The ClusterEnvironment Lightning's signal connector reads `auto_requeue` from, or None.

    `trainer._accelerator_connector.cluster_environment`: the strategy's public `cluster_environment` exists only
    for multi-process strategies, while a one-GPU Slurm job has a SLURMEnvironment too.
    """
    return getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)


def save_last_checkpoint(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Have `callback` write its last.ckpt now, as its own periodic save does (same name, same CheckpointIO, same
    bookkeeping of `last_model_path`). Every rank calls it; rank 0 writes.

    ModelCheckpoint has no public method for this: `trainer.save_checkpoint(path)` writes a file but bypasses the
    callback's state (its `last_model_path`, the step of its latest save, StreamCheckpoint's own `_save_checkpoint`).
    """
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def last_saved_step(callback: ModelCheckpoint) -> int | None:
    """The global step at which `callback` last saved (Lightning's `_last_global_step_saved`), or None."""
    return getattr(callback, "_last_global_step_saved", None)


def should_save_on_exception(callback: ModelCheckpoint, trainer: L.Trainer) -> bool:
    """ModelCheckpoint's own decision to save when a fit stops on an exception (`save_on_exception` set, not a
    sanity check or fast_dev_run, not saved at this step already)."""
    return bool(callback._should_save_on_exception(trainer))


def subcommand_parser(cli: Any, subcommand: str | None) -> Any:
    """The LightningArgumentParser of one LightningCLI subcommand (`fit`, ...), as SaveConfigCallback gets it: a config
    dumped with it compares with the `config.yaml` a run wrote."""
    return cli._parser(subcommand)
