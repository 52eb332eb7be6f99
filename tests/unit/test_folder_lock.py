"""The run-folder lock (issue 20, item 4): a second holder is refused with the first one's host and pid; the lock of
a process that died is taken over, as a Slurm requeue or a resume after a crash needs."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from timelit.training.run_folder import claim_run_folder
from timelit.utilities.folder_lock import FIT_LOCK, RunFolderBusy, lock_holder, lock_run_folder

HOLDER = """
import sys, time
from pathlib import Path
from timelit.utilities.folder_lock import lock_run_folder
lock_run_folder(sys.argv[1])
Path(sys.argv[2]).touch()
time.sleep(60)
"""


def hold_in_another_process(run_dir: Path, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(ready)])
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the holder did not start"
    return holder


def test_a_second_holder_is_refused_with_the_first_ones_host_and_pid_until_it_dies(tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = hold_in_another_process(run_dir, tmp_path)
    try:
        with pytest.raises(RunFolderBusy) as caught:
            lock_run_folder(run_dir)
        message = str(caught.value)
        assert f"{run_dir} is in use by another timelit fit (host {socket.gethostname()}, pid {holder.pid} " in message
        assert "\n" not in message
        assert f"pid {holder.pid}" in lock_holder(run_dir / FIT_LOCK)
    finally:
        holder.send_signal(signal.SIGKILL)  # as a node failure or Slurm's SIGKILL: no chance to release anything
        holder.wait()
    assert lock_holder(run_dir / FIT_LOCK) is None  # the kernel released the dead holder's flock
    with caplog.at_level(logging.INFO, logger="timelit"):
        lock = lock_run_folder(run_dir)
    assert f"took over {run_dir / FIT_LOCK} from a fit that is no longer running" in caplog.text
    assert f"pid {holder.pid}" in caplog.text
    lock.release()
    assert not (run_dir / FIT_LOCK).exists()
    lock_run_folder(run_dir).release()  # released: anyone may take it


class FakeTrainer:
    """What `claim_run_folder` reads of a Trainer: rank, run folder and callbacks with folders of their own."""

    def __init__(self, run_dir: Path, experts: Path, rank: int = 0):
        self.log_dir, self.default_root_dir, self.is_global_zero = str(run_dir), str(run_dir), rank == 0
        experts_callback = type("Merge", (), {"store_directory": lambda self, run_dir: experts})()
        self.callbacks = [experts_callback]


def test_claiming_a_run_folder_removes_the_leftovers_of_all_its_folders_and_says_how_much(tmp_path, caplog):
    run_dir, experts = tmp_path / "run", tmp_path / "store"  # an experts folder outside the run folder
    nested = run_dir / "other_run"  # a folder below the run folder is not the run's: left alone
    for folder in (run_dir / "checkpoints", experts, nested):
        folder.mkdir(parents=True)
    leftovers = [
        run_dir / ".final_model.safetensors.elsewhere.7.tmp",  # any host: the lock says nobody else writes here
        run_dir / "checkpoints" / ".last.ckpt.node1.12.tmp",
        experts / ".ema_0003.safetensors.node2.99.tmp",
    ]
    for leftover in leftovers:
        leftover.write_bytes(b"\0" * 1500)
    (nested / ".x.node1.5.tmp").write_bytes(b"\0")
    assert claim_run_folder(FakeTrainer(run_dir, experts, rank=1)) is None  # other ranks neither lock nor clean
    assert all(leftover.exists() for leftover in leftovers)
    with caplog.at_level(logging.WARNING, logger="timelit"):
        lock = claim_run_folder(FakeTrainer(run_dir, experts))
    assert not any(leftover.exists() for leftover in leftovers) and (nested / ".x.node1.5.tmp").exists()
    assert "removed 3 temporary file(s) of writes that were killed midway, freeing 4.5 kB" in caplog.text
    assert isinstance(lock_run_folder_refusal(run_dir), RunFolderBusy)
    lock.release()


def lock_run_folder_refusal(run_dir: Path) -> BaseException | None:
    try:
        lock_run_folder(run_dir).release()
    except RunFolderBusy as error:
        return error
    return None
