"""Files that a crash never leaves half written: write beside the target, fsync, rename over it.

    with atomic_file("experts/ema_0003.safetensors") as file: file.write(...)
    write_text("runs/x/results.json", text)
    replace_with(tmp, final)       for libraries that write to a file name themselves (safetensors, webdataset)

Every checkpointed artefact of timelit (experts, merged weights, shard indexes, results.json, manifests of sweeps)
goes through here, so "the old file or the new one, never half of one" holds everywhere, and new files get the mode
`open()` would give them (mkstemp and safetensors create 0600, unreadable to a group sharing a data root).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


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


def _writer_tag() -> str:
    """`<host>.<pid>`: process ids repeat across the nodes of a cluster that share a filesystem, so a pid alone
    would let two nodes' writers of the same file share a temporary name (and say nothing of who left one behind)."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}.{os.getpid()}"


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """A hidden name beside `path`, unique to this process on this host, that no reader of `path`'s folder lists."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_writer_tag()}.tmp")


def replace_with(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Make the finished temporary file `tmp` durable, give it the default mode and rename it to `path`."""
    tmp, path = Path(tmp), Path(path)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on a clean exit flush, fsync and rename it to `path`.

    On an exception the temporary file is removed and `path` is untouched. A process killed mid-write leaves only a
    hidden `.<name>.*.tmp` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(path) as file:
        file.write(text.encode())
