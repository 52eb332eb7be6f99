"""Slices of one tensor across the base and every expert, and the buffers they are read into.

Reading and arithmetic reuse a small set of named buffers for the whole merge (:class:`Workspace`): allocating fresh
memory for every expert and operation costs more than the arithmetic itself (page faults; on a virtual machine, often
far more), and reused buffers keep the peak memory flat.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from timelit.merging.sources import Source
from timelit.merging.whole import WholeTensor


class Workspace:
    """Named buffers reused by every chunk of one merge, grown to the largest chunk seen."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buffer = self._buffers.get((name, dtype))
        if buffer is None or len(buffer) < n:
            buffer = self._buffers[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buffer[:n]


class Chunk:
    """Elements ``start:stop`` of the flattened tensor ``key`` across the base and every expert, read on demand.

    Everything it returns is float32 and lives in workspace buffers: ``base`` stays valid while the chunk is being
    merged; an expert or task vector is read into one buffer that the next read overwrites, so a kernel may modify it
    in place but must finish with it (or ``clone`` it) before reading the next expert. :meth:`buffer` gives kernels
    scratch space of the chunk's length under a name of their own. ``thresholds[i]`` holds expert i's order
    statistics of ``|tau_i|`` over this tensor's scope (the ranks that ``Technique.ranks`` asked for).
    """

    def __init__(self, job: TensorJob, start: int, stop: int) -> None:
        self.key, self.start, self.stop = job.key, start, stop
        self.thresholds = job.thresholds
        self._job = job

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def n_experts(self) -> int:
        return len(self._job.experts)

    def buffer(self, name: str, dtype: torch.dtype = torch.float32, length: int | None = None) -> torch.Tensor:
        """An uninitialised buffer of the chunk's length (or ``length``, for scratch a kernel reuses within the
        chunk), shared with every other chunk that asks for ``name``."""
        return self._job.workspace.get(name, len(self) if length is None else length, dtype)

    @cached_property
    def base(self) -> torch.Tensor:
        base = self.buffer("chunk.base")
        self._job.base.read_into(self.key, self.start, base)
        return base

    def expert(self, i: int) -> torch.Tensor:
        """theta_i (overwritten by the next read)."""
        expert = self.buffer("chunk.expert")
        self._job.experts[i].read_into(self.key, self.start, expert)
        return expert

    def task_vector(self, i: int) -> torch.Tensor:
        """tau_i = theta_i - theta_0 (overwritten by the next read)."""
        return self.expert(i).sub_(self.base)

    def experts(self) -> Iterator[torch.Tensor]:
        return (self.expert(i) for i in range(self.n_experts))

    def task_vectors(self) -> Iterator[torch.Tensor]:
        """tau_i for every expert in store order; each overwrites the previous one."""
        return (self.task_vector(i) for i in range(self.n_experts))


@dataclass(frozen=True)
class TensorJob:
    """One tensor to merge, cut into chunks of at most ``chunk_size`` elements of its flattened form."""

    key: str
    numel: int
    base: Source
    experts: Sequence[Source]
    chunk_size: int
    thresholds: Sequence[tuple] = ()
    workspace: Workspace = field(default_factory=Workspace)

    def chunks(self) -> Iterator[Chunk]:
        for start in range(0, self.numel, self.chunk_size):
            yield Chunk(self, start, min(start + self.chunk_size, self.numel))

    def whole(self) -> WholeTensor:
        """The tensor read whole, for kernels that need a whole matrix (an SVD)."""
        return WholeTensor(self.key, self.base, self.experts)
