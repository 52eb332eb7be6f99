"""Safetensors files read by byte range and written atomically: header parsing, ranged reads, atomic writes.

    sha256 = save_weights("ema.safetensors", model.state_dict(), {"task": "3"})  # atomic, returns the file hash
    weights = load_weights("ema.safetensors")

The format (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian header length, a JSON header
``{"__metadata__": {str: str}, key: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the raw little-endian
tensor bytes. Files written here load with ``safetensors.torch.load_file`` and vice versa.

Why not ``safetensors.safe_open`` for the merge: it hands out fresh tensors sliced along the first dimension, while
the engine reads any flat element range of a tensor straight into a reused float32 buffer (``read_into``, one
``os.preadv``, no allocation), and keeps the lifetime of every file handle explicit. The worry that safe_open's memory
map inflates RSS (merging_anchors.md §3) did not show with safetensors 0.8.0: reading three 600 MB files through
``get_tensor`` with the handles open left RSS 23 MB higher.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from timelit.utilities.atomic import atomic_file
from timelit.utilities.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsFormatError(UserError, ValueError):
    """A file that is not a readable safetensors file (truncated, of another format, a corrupt header); the message
    names it, and `timelit` reports it in one line."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: its dtype, shape and byte offset from the start of the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


class SafetensorsReader:
    """An open safetensors file whose header has been validated; reads flat element ranges of one tensor.

    Construction reads only the header, so opening every expert to validate keys, shapes and dtypes before a merge
    costs a few kilobytes per file. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.entries, self.metadata = _parse_header(self.path, self._fd)
        except BaseException:
            os.close(self._fd)
            raise

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of the flattened tensor ``key``, in its stored dtype (a fresh tensor)."""
        entry = self.entries[key]
        buffer = torch.empty((stop - start) * entry.dtype.itemsize, dtype=torch.uint8)
        self._pread(key, start, buffer)
        return buffer.view(entry.dtype)

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Elements ``start:start + len(out)`` of tensor ``key`` converted into the float32 buffer ``out``.

        A float32 tensor is read straight into ``out``'s memory: no allocation, no copy.
        """
        if self.entries[key].dtype == torch.float32:
            self._pread(key, start, out.view(torch.uint8))
        else:
            out.copy_(self.read(key, start, start + len(out)))

    def _pread(self, key: str, start: int, buffer: torch.Tensor) -> None:
        entry = self.entries[key]
        view, position, done = memoryview(buffer.numpy()), entry.offset + start * entry.dtype.itemsize, 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], position + done)
            if got == 0:
                raise SafetensorsFormatError(f"{self.path}: tensor {key!r} is truncated (the file ends early)")
            done += got

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` with its shape."""
        entry = self.entries[key]
        return self.read(key, 0, entry.numel).reshape(entry.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_header(path: Path, fd: int) -> tuple[dict[str, Entry], dict[str, str]]:
    size = os.fstat(fd).st_size
    if size < 8:
        raise SafetensorsFormatError(
            f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)"
        )
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if length > min(size - 8, _MAX_HEADER):
        raise SafetensorsFormatError(
            f"{path}: not a safetensors file, or a truncated one (header length {length} exceeds the file size {size})"
        )
    try:
        header = json.loads(os.pread(fd, length, 8))
    except ValueError as err:
        raise SafetensorsFormatError(f"{path}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsFormatError(f"{path}: __metadata__ must map strings to strings")
    data_start, data_size = 8 + length, size - 8 - length
    entries = {key: _entry(path, key, info, data_start, data_size) for key, info in header.items()}
    return entries, dict(metadata)


def _entry(path: Path, key: str, info: object, data_start: int, data_size: int) -> Entry:
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
        dtype = info.get("dtype") if isinstance(info, dict) else info
        raise SafetensorsFormatError(f"{where}: unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise SafetensorsFormatError(f"{where}: invalid shape {shape!r}")
    entry = Entry(DTYPES[info["dtype"]], tuple(shape), 0)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise SafetensorsFormatError(f"{where}: invalid data_offsets {offsets!r}")
    begin, end = offsets
    if 0 <= begin <= end and end - begin == entry.numel * entry.dtype.itemsize and end > data_size:
        raise SafetensorsFormatError(
            f"{path}: the file is truncated: tensor {key!r} ends at byte {end} of the data section, "
            f"which holds only {data_size} bytes"
        )
    if not 0 <= begin <= end <= data_size or end - begin != entry.numel * entry.dtype.itemsize:
        raise SafetensorsFormatError(
            f"{where}: data_offsets {offsets} do not hold {entry.numel} x {info['dtype']} "
            f"inside the {data_size}-byte data section"
        )
    return Entry(entry.dtype, entry.shape, data_start + begin)


def save_weights(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Write ``tensors`` to ``path`` as safetensors, atomically, and return the file's sha256 (hex).

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the file is renamed over
    ``path`` with ``os.replace``; a crash at any point leaves either the old file or the new one, never half of one.
    Tensors are written in the mapping's order; non-contiguous tensors are made contiguous one at a time.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"{path}: safetensors metadata must map strings to strings; got {bad!r}")
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    with atomic_file(path) as file:
        for data in _serialised(encoded, tensors.values()):
            digest.update(data)
            file.write(data)
    return digest.hexdigest()


def _serialised(header: bytes, tensors: Iterable[torch.Tensor]) -> Iterator[bytes | memoryview]:
    yield struct.pack("<Q", len(header)) + header
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        yield memoryview(flat.view(torch.uint8).numpy())


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a whole safetensors file into memory (no memory map stays open)."""
    with SafetensorsReader(path) as reader:
        return {key: reader.tensor(key) for key in reader.entries}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header only."""
    with SafetensorsReader(path) as reader:
        return reader.metadata


def file_sha256(path: str | os.PathLike[str], block: int = 1 << 24) -> str:
    """The sha256 (hex) of a file, read in 16 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while data := file.read(block):
            digest.update(data)
    return digest.hexdigest()
