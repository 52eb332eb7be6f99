"""One tensor of the base and of every expert, read whole: the input of the whole-tensor kernels.

    u, s, vh = torch.linalg.svd(job.whole().task_vector(2))     # inside a kernel: expert 2's tau of one matrix

Element-wise kernels see a slice of a tensor (``chunks.Chunk``); an SVD needs the whole matrix, so the per-matrix
techniques (``spectral``, ``opcm``) read through a :class:`WholeTensor`. It holds only the base's tensor and reads an
expert's tensor when asked, into a fresh float32 tensor that the kernel owns: the memory of a merge is then bounded
by the tensors a kernel keeps (at most one per expert, so the largest tensor times the number of experts), never by
the model. Reads go through the same ``Source.read_into`` as chunks, so files and state dicts give the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property

import torch

from timelit.merging.sources import Source


def read_whole(source: Source, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Tensor ``key`` of ``source`` in float32 with its shape, in ``out`` (a float32 tensor of that size) or fresh."""
    entry = source.entries[key]
    flat = torch.empty(entry.numel, dtype=torch.float32) if out is None else out.view(-1)
    source.read_into(key, 0, flat)
    return flat.reshape(entry.shape)


def squared_norm(tensor: torch.Tensor) -> float:
    """||tensor||^2 accumulated in float64 (norms decide scales and ranks; float32 sums of millions would not)."""
    wide = tensor.reshape(-1).double()
    return float(wide @ wide)


class WholeTensor:
    """Tensor ``key`` across the base and every expert, each read whole in float32 when asked for."""

    def __init__(self, key: str, base: Source, experts: Sequence[Source]) -> None:
        self.key, self._base, self._experts = key, base, experts
        self.shape: tuple[int, ...] = tuple(base.entries[key].shape)

    @property
    def n_experts(self) -> int:
        return len(self._experts)

    @cached_property
    def base(self) -> torch.Tensor:
        """theta_0, read once (kernels must not modify it)."""
        return read_whole(self._base, self.key)

    def expert(self, i: int) -> torch.Tensor:
        """theta_i, a fresh tensor."""
        return read_whole(self._experts[i], self.key)

    def task_vector(self, i: int) -> torch.Tensor:
        """tau_i = theta_i - theta_0, a fresh tensor."""
        return self.expert(i).sub_(self.base)

    def task_vectors(self, indices: Sequence[int]) -> Iterator[torch.Tensor]:
        """tau_i for each expert in ``indices``, read into one buffer that the next overwrites: for kernels that
        consume each task vector before reading the next (a sum, an SVD), which saves an allocation per expert
        (on a virtual machine, page faults cost more than the read)."""
        buffer = torch.empty(self.shape, dtype=torch.float32)
        for i in indices:
            yield read_whole(self._experts[i], self.key, out=buffer).sub_(self.base)
