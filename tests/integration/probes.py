"""Callbacks the integration tests attach to real `timelit fit` runs (`--trainer.callbacks+=probes.RankProbe`, with
this folder on PYTHONPATH): they record what each rank did into `<run dir>/probe_rank<r>.json`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def weights_hash(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(-1).numpy().tobytes())
    return digest.hexdigest()


class RankProbe(Callback):
    """Per rank: the sample keys of every step, and weight hashes at each task start, evaluation and the end."""

    def __init__(self) -> None:
        self.record: dict = {"keys": [], "starts": {}, "evaluated": {}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record["keys"].append([trainer.current_epoch, trainer.global_step, batch["keys"]])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:  # after TimeMerge loaded the init weights and the first step ran on them
            self.record["starts"][trainer.current_epoch] = weights_hash(pl_module.model)

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.record["evaluated"][trainer.current_epoch] = weights_hash(pl_module.model)

    def on_fit_end(self, trainer, pl_module):
        self.record["final_live"] = weights_hash(pl_module.model)
        self.record["world_size"] = trainer.world_size
        run_dir = Path(trainer.logger.log_dir)
        (run_dir / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class SignalGate(Callback):
    """Holds a run at chosen points until a signal has reached its Preemption callback, so a test that signals a job
    from outside lands the signal exactly there, however slow the machine (a run of a few 10-ms steps is otherwise
    past any point before `scontrol` returns). At each point it writes `<marker_dir>/gate_<point>` and waits; the
    test waits for that file and sends the signal. Points: `step<N>` at the end of the batch that made global step N,
    `task<T>` at the end of task T, after its evaluation and task-end checkpoint. Lightning runs Checkpoint callbacks
    (Preemption is one) after this one at both hooks, so the run stops at the gate's point. The run's weights are
    untouched: an uninterrupted run without the gate is its reference."""

    def __init__(self, marker_dir: str, points: list[str], timeout: float = 300.0) -> None:
        self.marker_dir, self.points, self.timeout = Path(marker_dir), set(points), timeout

    def _hold(self, trainer, point: str) -> None:
        if point not in self.points:
            return
        preemption = next(cb for cb in trainer.callbacks if type(cb).__name__ == "Preemption")
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        (self.marker_dir / f"gate_{point}").touch()
        deadline = time.monotonic() + self.timeout
        while not preemption._received and time.monotonic() < deadline:
            time.sleep(0.02)  # a signal interrupts the sleep, its handler runs, the loop sees the flag

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._hold(trainer, f"step{trainer.global_step}")

    def on_train_epoch_end(self, trainer, pl_module):
        self._hold(trainer, f"task{trainer.current_epoch}")


class DiskFullAtSave(Callback):
    """Makes every checkpoint save from global step `from_step` on fail as a full disk does, with
    OSError(ENOSPC) from the run's CheckpointIO, and appends each attempt's path to `attempts_file`: issue 20's second
    save into a disk that had just refused the first one."""

    def __init__(self, attempts_file: str, from_step: int = 1) -> None:
        self.attempts_file, self.from_step = Path(attempts_file), from_step

    def setup(self, trainer, pl_module, stage):
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def save_or_fail(checkpoint, path, storage_options=None):
            if trainer.global_step < self.from_step:
                return save(checkpoint, path, storage_options)
            with open(self.attempts_file, "a") as attempts:
                attempts.write(f"{path}\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        io.save_checkpoint = save_or_fail


class KillMidWrite(Callback):
    """SIGKILLs the fit in the middle of its `nth` atomic write of the file named `name` (issue 20): the bytes are in
    the hidden temporary file, which is neither synced nor renamed yet, so the kill leaves it behind as a crash
    would. Installed when the callback is built, before the run writes anything (config.yaml is written in setup).
    Linux: the file of an fsync'd descriptor is read from /proc."""

    def __init__(self, name: str, nth: int = 1) -> None:
        self.name, self.nth, self.seen = name, nth, 0
        real_fsync = os.fsync

        def fsync(fd):
            try:
                written = Path(os.readlink(f"/proc/self/fd/{fd}")).name
            except OSError:
                written = ""
            if written.startswith(f".{self.name}.") and written.endswith(".tmp"):
                self.seen += 1
                if self.seen == self.nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_fsync(fd)

        os.fsync = fsync


class PauseAtStep(Callback):
    """At the end of global step `step`, writes `<marker_dir>/paused` and waits (up to `timeout` s) for
    `<marker_dir>/go`: a fit that is surely running while a test starts a second one into its folder."""

    def __init__(self, marker_dir: str, step: int = 1, timeout: float = 120.0) -> None:
        self.marker_dir, self.step, self.timeout = Path(marker_dir), step, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        (self.marker_dir / "paused").touch()
        deadline = time.monotonic() + self.timeout
        while not (self.marker_dir / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class RemoveAtTaskEnd(Callback):
    """Deletes the file `path` at the end of task `task`: a shard that vanishes while a run is in progress (the fit
    checks every shard when it starts)."""

    def __init__(self, path: str, task: int = 0) -> None:
        self.path, self.task = Path(path), task

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.task:
            self.path.unlink()
