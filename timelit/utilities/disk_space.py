"""Free space, and write errors that say which file failed, why, and how much room was left.

    raise write_error(path, error)            OSError -> one line: file, errno, free space
    require_space({folder: nbytes}, "...")    before a task boundary writes its files (TimeMerge)

Why: a full disk used to surface as `RuntimeError: basic_ios::clear: iostream error` from `torch.save`, or as a bare
`[Errno 28] No space left on device` without the file (issue 20). With ViT-L experts of 1.7 GB a user must know which
folder filled and by how much. `WriteError` stays an `OSError` with the original errno, so code that asks "was that a
full disk?" (`StreamCheckpoint.on_exception`) still can.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def format_bytes(count: float) -> str:
    """`1.5 GB`, `640 kB`, `12 B`: decimal units, as `df -H` and file managers show them."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent: a file that failed to appear still has a filesystem above it."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes that this (unprivileged) user can still write on the filesystem holding `path`."""
    stats = os.statvfs(_existing(Path(path)))
    return stats.f_bavail * stats.f_frsize


def _device(path: Path) -> int:
    return os.stat(_existing(path)).st_dev


class WriteError(OSError):
    """An OSError from writing `filename`, shown as one line with the errno's name and the free space left."""

    def __init__(self, code: int | None, strerror: str, filename: str, free: int | None):
        super().__init__(code, strerror, filename)
        self.free = free

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno, "OSError") if self.errno is not None else "OSError"
        left = f"; {format_bytes(self.free)} free there" if self.free is not None else ""
        return f"could not write {self.filename}: {name} ({self.strerror}){left}"


def write_error(path: str | os.PathLike[str], error: OSError) -> WriteError:
    """`error` (raised while writing `path`) as a WriteError; one that already is one is returned as it is."""
    if isinstance(error, WriteError):
        return error
    try:
        free: int | None = free_bytes(Path(path).parent)
    except OSError:
        free = None
    return WriteError(error.errno, error.strerror or str(error), str(path), free)


class DiskSpaceError(OSError):
    """Not enough free space for files about to be written; raised before anything is written."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def space_shortfalls(needs: Mapping[Path, int]) -> list[str]:
    """`folder needs X, has Y free` for every filesystem among `needs` (bytes to be written per folder) that has
    less free space than the folders on it need together."""
    by_device: dict[int, list[Path]] = {}
    for folder in needs:
        by_device.setdefault(_device(folder), []).append(folder)
    short = []
    for folders in by_device.values():
        needed, free = sum(needs[f] for f in folders), free_bytes(folders[0])
        if needed > free:
            where = " and ".join(str(f) for f in folders)
            short.append(f"{where} need(s) {format_bytes(needed)}, {format_bytes(free)} free")
    return short


def require_space(needs: Mapping[Path, int], what: str) -> None:
    """Raise DiskSpaceError, naming the folders and both sizes, when `needs` does not fit; `what` says what the
    bytes are for and what to do."""
    short = space_shortfalls(needs)
    if short:
        raise DiskSpaceError(f"not enough disk space {what}: {'; '.join(short)}")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL
