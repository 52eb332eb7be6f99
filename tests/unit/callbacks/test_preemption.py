"""Preemption: which step a signal stops at, what is saved, when Slurm is asked to requeue, and that nothing leaks.

A small linear model trains 2 tasks (epochs) of 4 batches with timelit's StreamCheckpoint; a helper callback sends a
real signal to this process at a chosen batch. The resume-to-identical-weights property is checked end to end in
tests/integration/test_preemption.py.
"""

from __future__ import annotations

import logging
import os
import signal
import stat

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from timelit.training.callbacks.checkpoint import StreamCheckpoint
from timelit.training.callbacks.preemption import Preempted, Preemption, slurm_job_to_requeue

BATCHES, VAL_BATCHES, TASKS = 4, 3, 2
ARRAY_TASK = {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS", "SLURM_JOB_NAME")


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.val_batches: dict[int, int] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            self.val_batches[self.current_epoch] = self.val_batches.get(self.current_epoch, 0) + 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(2 * BATCHES, 4, generator=generator), torch.randn(2 * BATCHES, 1))
        return DataLoader(data, batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(2 * VAL_BATCHES, 4), torch.randn(2 * VAL_BATCHES, 1)), batch_size=2)


class SendSignal(Callback):
    """Sends `signum` to this process at the start of a training or validation batch."""

    def __init__(self, signum: int, where: str, task: int, batch: int):
        self.signum, self.where, self.task, self.batch = signum, where, task, batch

    def _maybe_send(self, trainer, batch_idx):
        if trainer.current_epoch == self.task and batch_idx == self.batch and not trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "train":
            self._maybe_send(trainer, batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.where == "val":
            self._maybe_send(trainer, batch_idx)


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH that records its arguments and exits with the status in `status`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls, status = tmp_path / "scontrol_calls", tmp_path / "scontrol_status"
    status.write_text("0")
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit "$(cat {status})"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls, status


def fit(tmp_path, *callbacks, model=None, ckpt_path=None, **trainer_kwargs) -> tuple[L.Trainer, Linear]:
    model = model or Linear()
    trainer = L.Trainer(
        max_epochs=TASKS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[*callbacks, StreamCheckpoint(every_n_train_steps=1000, dirpath=str(tmp_path / "checkpoints"))],
        **trainer_kwargs,
    )
    model.trainer_under_test = trainer  # for the assertions of a test that ends in an exception
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def saved_step(tmp_path) -> int:
    return torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def test_sigterm_mid_task_saves_that_step_stops_with_143_and_resumes_to_the_end(tmp_path):
    handlers_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted) as stopped:
        fit(tmp_path, Preemption(), SendSignal(signal.SIGTERM, "train", task=0, batch=1))
    assert stopped.value.code == 128 + signal.SIGTERM and stopped.value.requeued is None
    assert saved_step(tmp_path) == 2  # batches 0 and 1 of task 0 trained, nothing after
    assert stopped.value.checkpoint == str(tmp_path / "checkpoints" / "last.ckpt")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers_before

    trainer, _ = fit(tmp_path, Preemption(), ckpt_path="last")
    assert trainer.global_step == TASKS * BATCHES and trainer.state.finished


@pytest.mark.parametrize(
    ("signum", "environment", "expected_call"),
    [
        (signal.SIGUSR1, ARRAY_TASK, "requeue 77_3"),
        (signal.SIGUSR1, {"SLURM_JOB_ID": "80"}, "requeue 80"),
        (signal.SIGUSR1, {}, None),  # not a Slurm job: saved and stopped, nothing to requeue
        (signal.SIGTERM, {"SLURM_JOB_ID": "80"}, None),  # scancel / preemption: Slurm decides
    ],
)
def test_only_the_requeue_signal_inside_slurm_requeues(
    tmp_path, monkeypatch, fake_scontrol, signum, environment, expected_call
):
    calls, _ = fake_scontrol
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(Preempted) as stopped:
        fit(tmp_path, Preemption(), SendSignal(signum, "train", task=1, batch=2))
    assert stopped.value.code == 128 + signum
    assert saved_step(tmp_path) == BATCHES + 3
    if expected_call is None:
        assert not calls.exists() and stopped.value.requeued is None
    else:
        assert calls.read_text().split("\n")[0] == expected_call
        assert stopped.value.requeued == expected_call.split()[1]


def test_a_failed_requeue_still_saves_and_says_how_to_resume(tmp_path, monkeypatch, fake_scontrol, caplog):
    calls, status = fake_scontrol
    status.write_text("1")
    monkeypatch.setenv("SLURM_JOB_ID", "80")
    with caplog.at_level(logging.ERROR, logger="timelit"), pytest.raises(Preempted) as stopped:
        fit(tmp_path, Preemption(), SendSignal(signal.SIGUSR1, "train", task=0, batch=0))
    assert stopped.value.code == 128 + signal.SIGUSR1 and stopped.value.requeued is None
    assert saved_step(tmp_path) == 1 and calls.read_text().strip() == "requeue 80"
    assert "`scontrol requeue 80` failed with status 1" in caplog.text and "submit the same command" in caplog.text


def test_requeue_can_be_turned_off(tmp_path, monkeypatch, fake_scontrol):
    calls, _ = fake_scontrol
    monkeypatch.setenv("SLURM_JOB_ID", "80")
    with pytest.raises(Preempted):
        fit(tmp_path, Preemption(requeue=False), SendSignal(signal.SIGUSR1, "train", task=0, batch=0))
    assert not calls.exists() and saved_step(tmp_path) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_evaluation_lets_it_finish_and_stops_right_after_the_task_end_checkpoint(tmp_path, signum):
    model = Linear()
    with pytest.raises(Preempted) as stopped:
        fit(tmp_path, Preemption(), SendSignal(signum, "val", task=0, batch=0), model=model)
    assert stopped.value.code == 128 + signum
    assert model.val_batches == {0: VAL_BATCHES}  # the evaluation of task 0 ran to its end
    assert saved_step(tmp_path) == BATCHES  # and no step of task 1 was trained before stopping

    # The task-end checkpoint resumes into task 1: task 0 is neither trained nor evaluated again.
    resumed = Linear()
    trainer, _ = fit(tmp_path, Preemption(), model=resumed, ckpt_path="last")
    assert trainer.global_step == TASKS * BATCHES and trainer.state.finished
    assert resumed.val_batches == {1: VAL_BATCHES}


def test_a_signal_on_the_last_batch_of_a_task_waits_for_its_evaluation_and_task_end_checkpoint(tmp_path):
    model = Linear()
    with pytest.raises(Preempted):
        fit(tmp_path, Preemption(), SendSignal(signal.SIGUSR1, "train", task=0, batch=BATCHES - 1), model=model)
    assert model.val_batches == {0: VAL_BATCHES} and saved_step(tmp_path) == BATCHES


class SignalWhileBuildingTheLoader(Linear):
    """Sends SIGTERM to itself in `train_dataloader`, which a run without a sanity check (a resume, or
    `num_sanity_val_steps=0`) calls after Lightning's signal registration and before `on_train_start`."""

    def train_dataloader(self):
        self.handler_seen = signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return super().train_dataloader()


def test_lightning_never_handles_a_sigterm_that_arrives_before_training_starts(tmp_path):
    """Lightning's SIGTERM handler broadcasts inside the handler (PL#21406); it must not be live in the window
    between its registration and on_train_start, where a SIGTERM to one rank would hang DDP."""
    model, preemption = SignalWhileBuildingTheLoader(), Preemption()
    with pytest.raises(Preempted) as stopped:
        fit(tmp_path, preemption, model=model, num_sanity_val_steps=0)
    trainer = model.trainer_under_test
    assert model.handler_seen == preemption._on_signal
    assert trainer.received_sigterm is False  # Lightning's handler never ran
    assert stopped.value.code == 128 + signal.SIGTERM and saved_step(tmp_path) == 1
    # After the fit, Lightning registers its handlers again (validate is not timelit's to handle).
    assert "register_signal_handlers" not in vars(trainer._signal_connector)


def test_a_signal_after_the_last_step_lets_the_run_finish(tmp_path, caplog):
    handler_before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING, logger="timelit"):
        trainer, model = fit(tmp_path, Preemption(), SendSignal(signal.SIGTERM, "val", task=TASKS - 1, batch=1))
    assert trainer.state.finished and trainer.global_step == TASKS * BATCHES
    assert model.val_batches[TASKS - 1] == VAL_BATCHES
    assert "SIGTERM arrived after the last training step: the run finished normally" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_needs_a_checkpoint_callback_that_writes_last_ckpt(tmp_path):
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[Preemption()])
    with pytest.raises(ValueError, match=r"ModelCheckpoint with save_last=True .* `checkpoint:` section"):
        trainer.fit(Linear())


def test_a_second_preemption_callback_is_inert(tmp_path):
    first, second = Preemption(), Preemption()
    with pytest.raises(Preempted):
        fit(tmp_path, first, second, SendSignal(signal.SIGTERM, "train", task=0, batch=1))
    assert first._received == {signal.SIGTERM} and second._received == set()


@pytest.mark.parametrize(
    ("environment", "job"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "12"}, "12"),
        ({"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2"}, "10_2"),
    ],
)
def test_the_job_id_given_to_scontrol(environment, job):
    assert slurm_job_to_requeue(environment) == job
