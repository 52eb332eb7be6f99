"""Files that a crash never leaves half written: write beside the target, fsync, rename over it.

    with atomic_file("experts/ema_0003.safetensors") as file: file.write(...)
    write_text("runs/x/results.json", text)
    replace_with(tmp, final)       for libraries that write to a file name themselves (safetensors, webdataset)
    remove_temporaries([run_dir, run_dir / "experts"])      at the start of a run: what killed writers left behind

Every checkpointed artefact of timelit (experts, merged weights, the final model, last.ckpt, results.json,
config.yaml, shard indexes, manifests of sweeps) goes through here, so "the old file or the new one, never half of
one" holds everywhere, and new files get the mode `open()` would give them (mkstemp and safetensors create 0600,
unreadable to a group sharing a data root).

Every temporary file is named `.<target name>.<host>.<pid>.tmp` (`temporary_path`): hidden, so no reader of the
folder lists it, and naming its writer, so that one cleanup (`remove_temporaries`) recognises the leftovers of every
kind of write. A write killed midway (SIGKILL, a node failure) leaves such a file, as large as the part written:
with ViT-B/16 up to ~600 MB per expert. One process writes one target at a time (a second thread writing the same
target at once would share the name).

An OSError while writing becomes a `timelit.utilities.disk_space.WriteError`: one line with the file, the errno and the
space left on its filesystem.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from timelit.utilities.disk_space import format_bytes, write_error

log = logging.getLogger(__name__)

_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


def _host() -> str:
    return socket.gethostname().split(".")[0] or "host"


def _writer_tag() -> str:
    """`<host>.<pid>`: process ids repeat across the nodes of a cluster that share a filesystem, so a pid alone
    would let two nodes' writers of the same file share a temporary name (and say nothing of who left one behind)."""
    return f"{_host()}.{os.getpid()}"


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """A hidden name beside `path`, unique to this process on this host, that no reader of `path`'s folder lists."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_writer_tag()}.tmp")


@dataclass(frozen=True)
class Temporary:
    """A temporary file of `temporary_path`'s form, and who wrote it."""

    path: Path
    target: str
    host: str
    pid: int

    @classmethod
    def parse(cls, path: str | os.PathLike[str]) -> Temporary | None:
        path = Path(path)
        match = _TEMPORARY.match(path.name)
        if match is None:
            return None
        return cls(path, match["target"], match["host"], int(match["pid"]))

    def writer_is_gone(self) -> bool:
        """Whether its writer ran on this host and no longer exists. Another host's pid says nothing here, and a
        live process of another user is not ours to judge."""
        if self.host != _host():
            return False
        if self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def temporaries(folder: str | os.PathLike[str]) -> list[Temporary]:
    """The temporary files directly in `folder` (not below it: a run folder may hold other runs' folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = (Temporary.parse(path) for path in folder.glob(".*.tmp"))
    return sorted((t for t in found if t is not None and t.path.is_file()), key=lambda t: t.path.name)


def remove_temporaries(folders: Iterable[str | os.PathLike[str]], only_gone_writers: bool = False) -> tuple[int, int]:
    """Delete the temporary files in `folders` and return (files, bytes) removed.

    A run removes every one at its start, with its run-folder lock held (nothing else writes there then);
    `only_gone_writers` keeps those whose writer may still be running (for cleanups during a run)."""
    files = freed = 0
    for folder in dict.fromkeys(Path(f) for f in folders):
        for temporary in temporaries(folder):
            if only_gone_writers and not temporary.writer_is_gone():
                continue
            try:
                size = temporary.path.stat().st_size
                temporary.path.unlink()
            except FileNotFoundError:
                continue
            files, freed = files + 1, freed + size
            log.debug("removed %s, left by a write that was killed midway", temporary.path)
    return files, freed


def remove_run_temporaries(folders: Iterable[str | os.PathLike[str]]) -> tuple[int, int]:
    """`remove_temporaries` at the start of a run, saying what it freed."""
    folders = list(folders)
    files, freed = remove_temporaries(folders)
    if files:
        log.warning(
            "removed %d temporary file(s) of writes that were killed midway, freeing %s (in %s)",
            files,
            format_bytes(freed),
            ", ".join(str(f) for f in folders),
        )
    return files, freed


def replace_with(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Make the finished temporary file `tmp` durable, give it the default mode and rename it to `path`."""
    tmp, path = Path(tmp), Path(path)
    try:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except OSError as error:
        raise write_error(path, error) from error


def _ours(error: OSError, *paths: Path) -> bool:
    """Whether `error` is about writing one of `paths` (a write() error names no file; opening a source does)."""
    return error.filename is None or str(error.filename) in {str(p) for p in paths}


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on a clean exit flush, fsync and rename it to `path`.

    On an exception the temporary file is removed and `path` is untouched; an OSError of the write itself becomes
    a WriteError naming `path`. A process killed mid-write leaves only `temporary_path(path)`.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.fchmod(fd, 0o666 & ~_umask())  # also when a file of a dead writer with this pid was there
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except OSError as error:
        if _ours(error, tmp, path, path.parent):
            raise write_error(path, error) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(path) as file:
        file.write(text.encode())
