"""Where the merge reads weights from: state dicts in memory or safetensors files, checked before any data is read.

    with open_sources(base, experts) as (base_source, expert_sources):
        chunk = expert_sources[3].read("token_embedding.weight", 0, 1 << 22)

A source is anything with ``name``, ``entries`` (key -> :class:`Entry`), ``read(key, start, stop)`` returning a
flat slice of one tensor in its stored dtype, and ``read_into(key, start, out)`` converting such a slice into a
float32 buffer. The merge engine sees only this interface, so a merge over files and the same merge over state dicts
run the same arithmetic on the same numbers and agree bitwise.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Protocol

import torch

from timelit.merging.safetensors_io import Entry, SafetensorsReader
from timelit.utilities.errors import UserError

StateDict = Mapping[str, torch.Tensor]
WeightsLike = StateDict | str | os.PathLike


class NamedWeights(dict):
    """A state dict that remembers the file it was read from (a Lightning checkpoint's weights), so that a mismatch
    with the base names that file, as it does for a safetensors path, rather than its position in the list."""

    def __init__(self, weights: StateDict, name: str) -> None:
        super().__init__(weights)
        self.name = name


class IncompatibleWeightsError(UserError, ValueError):
    """Weights that do not fit the base (other keys, shapes or dtypes: another model), or a `skip` pattern that
    matches none of its keys; the message names the file and the key."""


class Source(Protocol):
    name: str
    entries: Mapping[str, Entry]

    def read(self, key: str, start: int, stop: int) -> torch.Tensor: ...

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None: ...


class MemorySource:
    """A state dict seen as a source. Reads are views of the caller's tensors: the engine never writes into them."""

    def __init__(self, state_dict: StateDict, name: str) -> None:
        self.name = name
        self.entries: dict[str, Entry] = {}
        self._flat: dict[str, torch.Tensor] = {}
        for key, tensor in state_dict.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name}: {key!r} is a {type(tensor).__name__}, not a tensor")
            self.entries[key] = Entry(tensor.dtype, tuple(tensor.shape), 0)
            self._flat[key] = tensor.detach().to("cpu").reshape(-1)  # a view unless the tensor is not contiguous

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._flat[key][start:stop]

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        out.copy_(self._flat[key][start : start + len(out)])


def is_merged_dtype(dtype: torch.dtype) -> bool:
    """Floating tensors are merged; integer and boolean buffers (position ids, counters) are copied from the base."""
    return dtype.is_floating_point


@contextmanager
def open_sources(base: WeightsLike, experts: Sequence[WeightsLike]) -> Iterator[tuple[Source, list[Source]]]:
    """Open the base and the experts (file handles are closed on exit) and validate them against each other."""
    with ExitStack() as stack:

        def source(weights: WeightsLike, name: str) -> Source:
            if isinstance(weights, (str, os.PathLike)):
                return stack.enter_context(SafetensorsReader(weights))
            if isinstance(weights, Mapping):
                return MemorySource(weights, weights.name if isinstance(weights, NamedWeights) else name)
            raise TypeError(f"{name}: expected a state dict or a safetensors path, got {type(weights).__name__}")

        base_source = source(base, "base")
        expert_sources = [source(expert, f"experts[{i}]") for i, expert in enumerate(experts)]
        check_compatible(base_source, expert_sources)
        yield base_source, expert_sources


def check_compatible(base: Source, experts: Sequence[Source]) -> None:
    """Every expert must hold exactly the base's keys with the same shapes, floating where the base is floating.

    Floating dtypes may differ (all arithmetic is float32); the error names the expert (file) and the key.
    """
    for expert in experts:
        missing = [key for key in base.entries if key not in expert.entries]
        extra = [key for key in expert.entries if key not in base.entries]
        if missing or extra:
            raise IncompatibleWeightsError(
                f"{expert.name}: keys differ from the base {base.name}: {_describe(missing, extra)}"
            )
        for key, want in base.entries.items():
            got = expert.entries[key]
            if got.shape != want.shape:
                raise IncompatibleWeightsError(
                    f"{expert.name}: key {key!r} has shape {list(got.shape)} but the base {base.name} "
                    f"has {list(want.shape)}"
                )
            if is_merged_dtype(got.dtype) != is_merged_dtype(want.dtype) or (
                not is_merged_dtype(want.dtype) and got.dtype != want.dtype
            ):
                raise IncompatibleWeightsError(
                    f"{expert.name}: key {key!r} has dtype {got.dtype} but the base {base.name} has {want.dtype}"
                )


def _describe(missing: list[str], extra: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    return "; ".join(parts)


def merged_keys(base: Source, skip: Sequence[str]) -> list[str]:
    """The base's floating keys that no ``skip`` pattern (``fnmatch``, e.g. ``logit_scale`` or ``visual.ln_*``) matches.

    A pattern that matches no key is an error, since it is almost always a typo.
    """
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(key, pattern) for key in base.entries):
            near = difflib.get_close_matches(pattern, list(base.entries), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise IncompatibleWeightsError(f"skip pattern {pattern!r} matches no key of the base {base.name}{hint}")
    return [
        key
        for key, entry in base.entries.items()
        if is_merged_dtype(entry.dtype) and not any(fnmatch.fnmatchcase(key, p) for p in skip)
    ]
