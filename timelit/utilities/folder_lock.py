"""An advisory lock on a folder: flock(2) on a file in it, whose text says who holds it.

    lock = FolderLock.take(run_dir / "fit.lock", "host a, pid 12 (timelit fit), since ...")   # or the holder's text
    lock.release()

Two users: `timelit fit` locks its run folder for as long as it runs (`fit.lock`, `lock_run_folder`), and the local
sweep launcher locks every run folder it starts a fit in (`local-run.lock`, timelit/study/local.py).

Why flock and not a pid file: the kernel releases a flock when its holder dies, however it dies (SIGKILL, a
requeue, a node failure where the filesystem's lock manager sees it), so a lock file left by a dead holder is taken
over without any pid check, which could not see other hosts. `release` unlinks the file while still holding it; a
taker that opened the old file meanwhile notices, once it gets the lock, that the path now names another file (or
none) and opens again (`take`'s inode check), so no two processes ever both hold it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
from pathlib import Path

from timelit.utilities.errors import UserError

log = logging.getLogger(__name__)

FIT_LOCK = "fit.lock"


def holder_text(what: str) -> str:
    """`host h, pid 12 (what), since 2025-01-01T10:00:00+01:00`: who holds a lock, for the message of whoever
    cannot take it."""
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"host {socket.gethostname()}, pid {os.getpid()} ({what}), since {since}"


class FolderLock:
    """An flock(2) on `path`, held by this process (and children it passes `fd` to) until `release`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd
        self.previous = ""  # the text a dead holder left in the file, when this lock took it over

    @classmethod
    def take(cls, path: str | os.PathLike[str], text: str) -> FolderLock | str:
        """The lock, with `text` written into its file; or, when another live process holds it, that holder's text."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip()
                os.close(fd)
                return holder or "another process (it has not written its name yet)"
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder released it (unlinked the file) between our open and flock: open the new one
        lock = cls(path, fd)
        lock.previous = os.read(fd, 4096).decode(errors="replace").strip()
        lock.write_text(text)
        return lock

    def write_text(self, text: str) -> None:
        """Replace the holder's text (what a process that cannot take the lock is told)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{text}\n".encode(), 0)

    def release(self) -> None:
        # Unlinked while still locked: see the module docstring.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)


def lock_holder(path: str | os.PathLike[str]) -> str | None:
    """Who holds the lock of `path` now, or None; takes nothing and creates nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 4096).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)
    return None


class RunFolderBusy(UserError, RuntimeError):
    """Another live `timelit fit` holds the run folder: a user error (one line, exit status 2), since the fix is to
    wait or to choose another folder."""


def lock_run_folder(run_dir: str | os.PathLike[str]) -> FolderLock:
    """Take `<run_dir>/fit.lock` for this fit, or raise RunFolderBusy naming the fit that holds it.

    Two fits writing one run folder would delete each other's merged files and overwrite each other's last.ckpt
    (issue 20). A Slurm requeue or a resume after a crash finds the lock of the dead fit released and takes it over.
    """
    path = Path(run_dir) / FIT_LOCK
    lock = FolderLock.take(path, holder_text("timelit fit"))
    if isinstance(lock, str):
        raise RunFolderBusy(
            f"{run_dir} is in use by another timelit fit ({lock}, per {path}); wait for it to end, stop it, or run "
            "this one in another folder (--trainer.logger.init_args.name NEW)"
        )
    if lock.previous:
        log.info("took over %s from a fit that is no longer running (%s)", path, lock.previous)
    return lock
