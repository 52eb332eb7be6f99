"""StreamCheckpoint and AtomicCheckpointIO: last.ckpt is replaced, never rewritten in place, wherever $TMPDIR is;
a failed save keeps the previous last.ckpt; an exception under DDP does not save (the save's barrier would hang).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset

from timelit.training.callbacks.checkpoint import AtomicCheckpointIO, StreamCheckpoint
from timelit.training.lightning_cli import install_atomic_checkpoint_io

SHM = Path("/dev/shm")


def checkpoint(step: int, megabytes: int = 4) -> dict:
    """A stand-in for a Lightning checkpoint (AtomicCheckpointIO refuses to load a file without Lightning's version)."""
    weights = torch.full((megabytes * 2**18,), float(step))
    return {"global_step": step, "weights": weights, "pytorch-lightning_version": L.__version__}


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def tmpdir_elsewhere(tmp_path, monkeypatch) -> Path:
    """$TMPDIR on another filesystem than the run directory, as node-local /tmp vs a shared run directory."""
    if not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than pytest's tmp_path")
    staging = Path(tempfile.mkdtemp(dir=SHM, prefix="timelit-test-"))
    monkeypatch.setenv("TMPDIR", str(staging))
    monkeypatch.setattr(tempfile, "tempdir", str(staging))  # gettempdir() caches $TMPDIR on first use
    yield staging
    for leftover in staging.iterdir():
        leftover.unlink()
    staging.rmdir()


def test_last_ckpt_is_replaced_not_rewritten_when_tmpdir_is_on_another_filesystem(tmp_path, tmpdir_elsewhere):
    """A reader that opened last.ckpt before a save still reads the whole old checkpoint: the new one arrived by a
    rename. (Lightning's default moves its $TMPDIR file across filesystems by copying into last.ckpt in place, where
    a SIGKILL mid-copy leaves a truncated last.ckpt.)"""
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(checkpoint(1), path)
    with open(path, "rb") as reader:
        io.save_checkpoint(checkpoint(2), path)
        old = torch.load(reader, weights_only=True)
    assert old["global_step"] == 1 and torch.equal(old["weights"], checkpoint(1)["weights"])
    new = io.load_checkpoint(path, weights_only=True)
    assert new["global_step"] == 2 and torch.equal(new["weights"], checkpoint(2)["weights"])
    assert hidden_leftovers(path.parent) == [] and list(tmpdir_elsewhere.iterdir()) == []
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_a_save_that_fails_midway_keeps_the_previous_last_ckpt_and_no_temporary_file(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(1), path)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        io.save_checkpoint({**checkpoint(2), "bad": Unpicklable()}, path)  # torch.save has opened its file by then
    assert io.load_checkpoint(path, weights_only=True)["global_step"] == 1
    assert hidden_leftovers(tmp_path) == []


def test_a_save_removes_what_killed_saves_on_this_host_left_behind(tmp_path):
    path = tmp_path / "last.ckpt"
    host = socket.gethostname().split(".")[0]
    dead = tmp_path / f".last.ckpt.{host}.{2**22 + 12345}.tmp"  # above the usual pid_max: no such process
    other_host = tmp_path / f".last.ckpt.{host}x.{2**22 + 12345}.tmp"
    alive = tmp_path / f".last.ckpt.{host}.1.tmp"  # pid 1 exists (init)
    for leftover in (dead, other_host, alive):
        leftover.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint(checkpoint(1, megabytes=1), path)
    assert hidden_leftovers(tmp_path) == sorted([other_host.name, alive.name])


def test_remove_checkpoint_and_remote_paths_stay_lightnings(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "x.ckpt"
    io.save_checkpoint(checkpoint(1, megabytes=1), path)
    io.remove_checkpoint(path)
    assert not path.exists()
    calls = []
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", lambda self, *args: calls.append(args[1]))
    io.save_checkpoint(checkpoint(1, megabytes=1), "memory://bucket/last.ckpt")
    assert calls == ["memory://bucket/last.ckpt"]


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)


def test_the_cli_installs_atomic_io_only_where_lightning_would_use_its_default():
    default = _trainer()
    assert install_atomic_checkpoint_io(default) and isinstance(default.strategy.checkpoint_io, AtomicCheckpointIO)

    class Mine(TorchCheckpointIO):
        pass

    for plugin in (Mine(), AsyncCheckpointIO()):
        configured = _trainer(plugins=[plugin])
        assert not install_atomic_checkpoint_io(configured)
        assert configured.strategy.checkpoint_io is plugin
    strategy = SingleDeviceStrategy("cpu", checkpoint_io=Mine())
    assert not install_atomic_checkpoint_io(_trainer(strategy=strategy))
    assert type(strategy.checkpoint_io) is Mine


# ---------------------------------------------------------------------------------------------------- on exception


class FailsAtStep(L.LightningModule):
    def __init__(self, fail_at: int):
        super().__init__()
        self.layer, self.fail_at = torch.nn.Linear(4, 1), fail_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at:
            raise RuntimeError("a rank-local error")
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=2)


class ReportsRanks(Callback):
    """From the exception on, the trainer reports `world_size` ranks (runs before checkpoint callbacks)."""

    def __init__(self, world_size: int, monkeypatch):
        self.world_size, self.monkeypatch = world_size, monkeypatch

    def on_exception(self, trainer, pl_module, exception):
        self.monkeypatch.setattr(SingleDeviceStrategy, "world_size", property(lambda _: self.world_size), raising=False)


@pytest.mark.parametrize(("world_size", "saved"), [(1, True), (2, False)])
def test_an_exception_saves_last_ckpt_only_in_a_single_process_run(tmp_path, monkeypatch, caplog, world_size, saved):
    """Under DDP one rank's exception must not start a save: its barrier would wait for ranks that sit in the
    step's all-reduce, and the job would hang until the collective's timeout instead of failing."""
    stream = StreamCheckpoint(every_n_train_steps=1000, dirpath=str(tmp_path))
    trainer = _trainer(max_epochs=1, callbacks=[ReportsRanks(world_size, monkeypatch), stream])
    with pytest.raises(RuntimeError, match="a rank-local error"):
        trainer.fit(FailsAtStep(fail_at=3))
    assert (tmp_path / "last.ckpt").exists() == saved
    if saved:
        assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
    else:
        assert "last.ckpt is not saved on an exception with 2 ranks" in caplog.text


def test_timelit_fit_writes_its_checkpoints_through_atomic_io(tiny_benchmark, tmp_path, quick_fit_args):
    from timelit.commands.cli import run_lightning

    cli = run_lightning(quick_fit_args(tiny_benchmark, tmp_path, tasks=1, steps=2))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 2
    assert hidden_leftovers(checkpoints) == []


class SavesFailFrom(TorchCheckpointIO):
    """A CheckpointIO whose saves fail, from global step `step` on, with `error`; counts every attempt."""

    def __init__(self, step: int, error: BaseException):
        self.step, self.error, self.attempts = step, error, []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.attempts.append(checkpoint["global_step"])
        if checkpoint["global_step"] >= self.step:
            raise self.error
        super().save_checkpoint(checkpoint, path, storage_options)


def test_a_save_that_failed_is_not_attempted_again_on_the_exception(tmp_path):
    """A full disk fails the periodic save; the save on exception would fail the same way (issue 20)."""
    io = SavesFailFrom(step=4, error=RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos"))
    stream = StreamCheckpoint(every_n_train_steps=2, dirpath=str(tmp_path))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        _trainer(max_epochs=1, callbacks=[stream], plugins=[io]).fit(FailsAtStep(fail_at=1000))
    assert io.attempts == [2, 4]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2


def test_a_full_disk_anywhere_is_not_written_to_on_the_exception(tmp_path):
    io = SavesFailFrom(step=1000, error=RuntimeError("never"))

    class DiskFull(FailsAtStep):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                raise OSError(28, "No space left on device", "experts/expert_0000.safetensors")
            return super().training_step(batch, batch_idx)

    with pytest.raises(OSError, match="No space left"):
        _trainer(max_epochs=1, callbacks=[StreamCheckpoint(every_n_train_steps=1000)], plugins=[io]).fit(
            DiskFull(fail_at=1000)
        )
    assert io.attempts == []


def test_a_failing_save_on_the_exception_leaves_the_run_its_own_error(tmp_path, caplog):
    """An exception out of `on_exception` would replace the run's and cut Lightning's error path short (the data
    module's `on_exception`, which stops loader workers, would not run)."""
    io = SavesFailFrom(step=0, error=OSError(5, "Input/output error"))
    stream = StreamCheckpoint(every_n_train_steps=1000, dirpath=str(tmp_path))
    with pytest.raises(RuntimeError, match="a rank-local error"):
        _trainer(max_epochs=1, callbacks=[stream], plugins=[io]).fit(FailsAtStep(fail_at=3))
    assert io.attempts == [3]
    assert "last.ckpt could not be saved after RuntimeError" in caplog.text
