"""The running state of an incremental merge on disk: read from one safetensors file, written to the next.

    merged = engine.update(Ties(k=0.3), base, [expert_t], "all_state_0002.safetensors", "all_state_0003.safetensors")

An incremental technique (``Technique.incremental``) merges experts 1..t as a left fold of per-entry state: for TIES
the positive and negative sums and counts of the trimmed task vectors, for task arithmetic their sum, for SLERP the
fold so far. Keeping that state in a file beside the expert store lets a TIME `all` protocol fold in the newest
expert alone at each task boundary, reading one expert and the state (a few models' worth) whatever t is, instead
of every expert again.

The file is a safetensors file of flat float32 tensors named ``<field>:<key>`` (one per state field and merged key)
with the technique, its hyperparameters and the number of members folded in the metadata; the caller adds what
identifies the members (``timelit.members``). It is written chunk by chunk into a temporary file at precomputed
offsets, then fsynced and renamed (``atomic.replace_with``): a process killed during an update leaves the previous
state file as it was and at most a temporary file, which the next run's cleanup removes, so an update that is run
again reads the same state and writes the same bits.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from timelit.merging.safetensors_io import SafetensorsReader
from timelit.utilities.atomic import replace_with, temporary_path
from timelit.utilities.disk_space import write_error

if TYPE_CHECKING:
    from timelit.merging.chunks import Chunk

Technique = Any  # timelit.merging.technique.Technique, which refers to this module: no import, no cycle
FOLDED_KEY = "timelit.folded"
TECHNIQUE_KEY = "timelit.technique"
HPARAMS_KEY = "timelit.hparams"
AUTO_SUM_FIELD = "lines_sum"
"""The extra field of a merge with LiNeS ``alpha="auto"``: the plain sum of the task vectors, whose norm alpha needs."""


def state_name(field: str, key: str) -> str:
    return f"{field}:{key}"


def fields_of(technique: Technique) -> list[str]:
    """The state fields an incremental merge with ``technique`` keeps per merged key."""
    fields = list(technique.state_fields())
    if technique.scaling().alpha == "auto":
        fields.append(AUTO_SUM_FIELD)
    return fields


def state_bytes(technique: Technique, numels: Sequence[int]) -> int:
    """The size of the state file of ``technique`` over merged tensors of ``numels`` entries (headers aside)."""
    return 4 * len(fields_of(technique)) * sum(numels)


def hparams_record(technique: Technique) -> str:
    return json.dumps(technique.hparams(), sort_keys=True)


class StateWriter:
    """A state file being written: its header is known up front, chunks go to their offsets in a temporary file, and
    :meth:`commit` makes it the file (:meth:`abort` drops it)."""

    def __init__(self, path: str | os.PathLike[str], layout: Sequence[tuple[str, int]], metadata: Mapping[str, str]):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, numel in layout:
            header[name] = {"dtype": "F32", "shape": [numel], "data_offsets": [offset, offset + 4 * numel]}
            self.offsets[name] = offset
            offset += 4 * numel
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        data_start = 8 + len(encoded)
        self.offsets = {name: data_start + at for name, at in self.offsets.items()}
        self.tmp = temporary_path(self.path)
        try:
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.ftruncate(self._fd, data_start + offset)
            self._pwrite(struct.pack("<Q", len(encoded)) + encoded, 0)
        except OSError as error:
            self.abort()
            raise write_error(self.path, error) from error

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Entries ``start:start + len(values)`` of the flat float32 tensor ``name``."""
        if values.dtype != torch.float32:
            raise TypeError(f"{self.path}: state {name!r} must be float32, got {values.dtype}")
        data = memoryview(values.contiguous().view(torch.uint8).numpy())
        try:
            self._pwrite(data, self.offsets[name] + 4 * start)
        except OSError as error:
            raise write_error(self.path, error) from error

    def _pwrite(self, data: bytes | memoryview, position: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            written = os.pwrite(self._fd, view, position)
            view, position = view[written:], position + written

    def commit(self) -> None:
        os.close(self._fd)
        self._fd = -1
        replace_with(self.tmp, self.path)

    def abort(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)


class Running:
    """One update of an incremental merge, as the technique's kernel sees it: the state of a chunk is loaded from
    the previous file (nothing when ``folded`` is 0) and stored to the next one.

    Args:
        previous: the previous state file, or None before the first member.
        writer: the next state file.
        folded: members already folded into ``previous``; the new ones have store indices ``folded``, ``folded+1``...
    """

    def __init__(self, previous: SafetensorsReader | None, writer: StateWriter, folded: int) -> None:
        self.previous, self.writer, self.folded = previous, writer, folded

    def load(self, chunk: Chunk, fields: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """The chunk's state in the workspace buffers ``fields`` names (uninitialised before the first member)."""
        state = {field: chunk.buffer(buffer) for field, buffer in fields.items()}
        if self.folded:
            assert self.previous is not None
            for field, values in state.items():
                self.previous.read_into(state_name(field, chunk.key), chunk.start, values)
        return state

    def store(self, chunk: Chunk, state: Mapping[str, torch.Tensor]) -> None:
        for field, values in state.items():
            self.writer.write(state_name(field, chunk.key), chunk.start, values)
