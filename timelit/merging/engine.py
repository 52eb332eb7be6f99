"""The streaming merge engine: one pass per scope group, chunk by chunk, expert by expert.

    merged = run(Ties(k=0.3, scope="tower"), "base.safetensors", ExpertStore("experts").paths)

Memory is bounded by the output (one model in the base's dtype) plus a few chunk-sized buffers (float32; float64
for the sums of weighted averages and SLERP), whatever the number of experts: every kernel folds experts one at a time,
safetensors inputs are read by byte range (no memory maps), and no tensor is ever stacked across experts
(ARCHITECTURE.md property 3). A merge over state dicts in memory goes through the same code with the same chunking,
so the two agree bitwise. Two kinds of technique go beyond that bound, each by a stated amount: the per-matrix SVD
methods (``spectral``) read one matrix of every expert whole, at most the largest matrix times the number of
experts; a sequential technique (OPCM) is folded over the experts one step at a time (:func:`step`), holding the
running merge and one float32 model of its update.

An incremental technique (``Technique.incremental``) can also be run by :func:`update`: the new experts are folded
into running state read from a file and written to the next one (``running``), which gives the bits of :func:`run`
over every expert while reading only the new ones; a TIME `all` protocol does this at each task boundary.

Per scope group (the whole model, each tower, or each tensor, see ``Scope``):
1. order statistics, if the technique trims by magnitude: two streamed passes (``order_stats``);
2. the merge pass: per tensor and chunk, the technique's kernel gives merged weights, or a merged task vector that
   is added to the base scaled by lambda or LiNeS;
3. TIES-family patches: positions whose elected sign was 0 get the group's majority sign (``Elected``);
4. with LiNeS ``alpha="auto"``: the group's merged task vectors are held in float32 until alpha is known.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from timelit.merging import order_stats
from timelit.merging.chunks import Chunk, TensorJob, Workspace
from timelit.merging.lines import auto_alpha, depth_ratios
from timelit.merging.running import (
    AUTO_SUM_FIELD,
    FOLDED_KEY,
    HPARAMS_KEY,
    TECHNIQUE_KEY,
    Running,
    StateWriter,
    fields_of,
    hparams_record,
    state_name,
)
from timelit.merging.safetensors_io import SafetensorsReader
from timelit.merging.sources import MemorySource, Source, WeightsLike, merged_keys, open_sources
from timelit.merging.task_vectors import Elected, fold_sum, scope_groups, sum_in_order
from timelit.merging.technique import FoldStep, MergeState, SequentialTechnique, Technique

DEFAULT_CHUNK_SIZE = 1 << 22
"""4,194,304 elements (16 MB in float32) per chunk: ViT-B/16's 25.3M-entry token embedding is read in 7 slices."""

DEFAULT_THREADS = 1
"""The merge runs ~20 element-wise operations per expert and chunk, each a parallel region when torch uses several
threads. On a busy machine (other jobs, or every DDP rank merging at once) each region waits for a descheduled
worker thread: on the shared 2-core VM of bench/README.md (merge section), TIES over two ViT-B/16 experts took
6-12 s on one thread and 33-53 s on two, side by side. One thread is the robust default; ``threads=None`` keeps
torch's setting."""


def run(
    technique: Technique,
    base: WeightsLike,
    experts: Sequence[WeightsLike],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = DEFAULT_THREADS,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Merge ``experts`` (state dicts or safetensors paths, oldest first) onto ``base`` with ``technique``.

    Keys, shapes and dtypes of every input are validated before any tensor data is read. Returns a new state dict
    with the base's keys, order, shapes and dtypes; the inputs are never modified. ``threads`` sets torch's intra-op
    threads for the merge (restored afterwards); ``None`` keeps the current setting.
    """
    _check_positive("chunk_size", chunk_size)
    with _threads(threads), open_sources(base, experts) as (base_source, expert_sources):
        technique.check_experts(len(expert_sources))
        keys = merged_keys(base_source, technique.skip)
        if isinstance(technique, SequentialTechnique):
            return _fold(technique, base_source, expert_sources, keys, progress)
        return _Merge(technique, base_source, expert_sources, chunk_size).run(keys, progress)


def update(
    technique: Technique,
    base: WeightsLike,
    members: Sequence[WeightsLike],
    previous_state: str | os.PathLike[str] | None,
    state: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = DEFAULT_THREADS,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Fold ``members`` (oldest first) into the running state of an incremental technique and return the merge of
    every member folded so far: bitwise :func:`run` over all of them, in store order.

    ``previous_state`` is the state file of the members before (None: none yet); the new state goes to ``state``,
    written atomically with ``metadata`` (e.g. what identifies the members) and the number of members folded. Its
    chunking must be the previous update's (it is the default's unless given). One member alone gives the state of
    that member and the merge of one expert (a TIME protocol deploys the expert itself there, as ``merge_all``
    does).
    """
    _check_positive("chunk_size", chunk_size)
    if not technique.incremental:
        raise ValueError(f"{technique.name} is not incremental (its module docstring says why): merge with run()")
    if not members:
        raise ValueError("update needs at least one new member")
    with _threads(threads), open_sources(base, members) as (base_source, sources):
        previous = SafetensorsReader(previous_state) if previous_state is not None else None
        try:
            folded = _folded(previous, technique) if previous is not None else 0
            if folded + len(members) > 1:
                technique.check_experts(folded + len(members))
            keys = merged_keys(base_source, technique.skip)
            layout = [
                (state_name(field, key), base_source.entries[key].numel)
                for key in keys
                for field in fields_of(technique)
            ]
            if previous is not None:
                _check_layout(previous, layout)
            record = {
                **dict(metadata or {}),
                FOLDED_KEY: str(folded + len(members)),
                TECHNIQUE_KEY: technique.name,
                HPARAMS_KEY: hparams_record(technique),
            }
            writer = StateWriter(state, layout, record)
            try:
                running = Running(previous, writer, folded)
                merged = _Merge(technique, base_source, sources, chunk_size, running).run(keys, progress)
                writer.commit()
            except BaseException:
                writer.abort()
                raise
        finally:
            if previous is not None:
                previous.close()
    return merged


def state_members(path: str | os.PathLike[str]) -> tuple[int, dict[str, str]]:
    """How many members a state file has folded, and its metadata."""
    with SafetensorsReader(path) as reader:
        return int(reader.metadata.get(FOLDED_KEY, "0")), reader.metadata


def _folded(previous: SafetensorsReader, technique: Technique) -> int:
    metadata = previous.metadata
    if metadata.get(TECHNIQUE_KEY) != technique.name or metadata.get(HPARAMS_KEY) != hparams_record(technique):
        raise ValueError(
            f"{previous.path} holds the state of {metadata.get(TECHNIQUE_KEY)} {metadata.get(HPARAMS_KEY)}, not of "
            f"{technique.name} {hparams_record(technique)}"
        )
    return int(metadata[FOLDED_KEY])


def _check_layout(previous: SafetensorsReader, layout: Sequence[tuple[str, int]]) -> None:
    got = {name: entry.numel for name, entry in previous.entries.items() if entry.dtype == torch.float32}
    if got != dict(layout):
        raise ValueError(f"{previous.path}: its state tensors do not match the base's merged keys")


def step(
    technique: SequentialTechnique,
    base: WeightsLike,
    previous: WeightsLike | None,
    expert: WeightsLike,
    state: MergeState | None,
    *,
    threads: int | None = DEFAULT_THREADS,
) -> tuple[dict[str, torch.Tensor], MergeState | None]:
    """One step of a sequential technique: fold ``expert`` into ``previous`` (the merge so far, carrying ``state``;
    both ``None`` before the first expert). Returns the merged state dict and the state to carry on."""
    inputs = [expert] if previous is None else [expert, previous]
    with _threads(threads), open_sources(base, inputs) as (base_source, sources):
        keys = merged_keys(base_source, technique.skip)
        previous_source = sources[1] if previous is not None else None
        return _step(technique, FoldStep(base_source, previous_source, sources[0], keys, state))


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the merge and restored afterwards (``None``: unchanged)."""
    _check_positive("threads", 1 if threads is None else threads)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous)
        yield
    finally:
        torch.set_num_threads(previous)


def _base_copy(base: Source, key: str) -> torch.Tensor:
    entry = base.entries[key]
    return base.read(key, 0, entry.numel).clone().reshape(entry.shape)


def _step(technique: SequentialTechnique, fold: FoldStep) -> tuple[dict[str, torch.Tensor], MergeState | None]:
    """The technique's step, with the keys it does not merge copied from the base: a whole state dict."""
    merged, state = technique.step(fold)
    return {key: merged[key] if key in merged else _base_copy(fold.base, key) for key in fold.base.entries}, state


def _fold(
    technique: SequentialTechnique, base: Source, experts: Sequence[Source], keys: list[str], progress: bool
) -> dict[str, torch.Tensor]:
    """The sequential technique over every expert in store order, from an empty merge: each step reads the
    previous step's output (held in the base's dtypes, as a run's merged file holds it), so the fold equals a run
    that carries the state from task to task, bit for bit."""
    merged: dict[str, torch.Tensor] = {}
    state: MergeState | None = None
    for i, expert in enumerate(tqdm(experts, disable=not progress, unit="expert", desc=technique.name)):
        previous = MemorySource(merged, "the merge so far") if i else None
        merged, state = _step(technique, FoldStep(base, previous, expert, keys, state))
    return merged


class _Merge:
    """One merge: of every expert (``running`` None), or of the new experts into running state (:func:`update`)."""

    def __init__(
        self,
        technique: Technique,
        base: Source,
        experts: Sequence[Source],
        chunk_size: int,
        running: Running | None = None,
    ) -> None:
        self.technique, self.base, self.experts, self.chunk_size = technique, base, experts, chunk_size
        self.running = running
        self.members = len(experts) + (running.folded if running else 0)
        self.scaling = technique.scaling()
        self.ratios = depth_ratios(base.entries) if self.scaling.beta else {}
        self.out: dict[str, torch.Tensor] = {}
        self.workspace = Workspace()

    def run(self, keys: list[str], progress: bool) -> dict[str, torch.Tensor]:
        merged = set(keys)
        for key in self.base.entries:
            if key not in merged:  # non-floating or skipped: the base's own values
                self.out[key] = _base_copy(self.base, key)
        passes = 3 if self.technique.order_statistics else 1
        with tqdm(total=passes * len(keys), disable=not progress, unit="tensor", desc=self.technique.name) as bar:
            self.bar = bar
            for name, group in scope_groups(keys, getattr(self.technique, "scope", "model")):
                self._merge_group(name, group)
        return {key: self.out[key] for key in self.base.entries}

    def _job(self, key: str, thresholds: Sequence[tuple] = ()) -> TensorJob:
        numel = self.base.entries[key].numel
        return TensorJob(key, numel, self.base, self.experts, self.chunk_size, thresholds, self.workspace)

    def _merge_group(self, name: str, keys: list[str]) -> None:
        thresholds = self._thresholds(name, keys)
        undecided = _Undecided()
        auto = self.scaling.alpha == "auto"
        held: dict[str, torch.Tensor] = {}  # merged task vectors, only while alpha is "auto"
        sum_l1 = 0.0
        self.bar.set_description(f"{self.technique.name}: merge {name}")
        for key in keys:
            target = held.setdefault(key, torch.empty(self.base.entries[key].numel)) if auto else self._output(key)
            job = self._job(key, thresholds)
            results = (
                self.technique.merge_tensor(job)
                if self.running is None
                else self.technique.update_tensor(job, self.running)
            )
            for chunk, result in results:
                tau = undecided.record(chunk, result)
                if auto:
                    target[chunk.start : chunk.stop] = tau
                    sum_l1 += _l1(self._task_vector_sum(chunk))
                else:
                    target[chunk.start : chunk.stop] = self._theta(chunk.base, tau, key)
            self.bar.update()
        if auto:
            for key, positions, _, value in undecided.resolved():
                held[key][positions] = value
            alpha = auto_alpha(sum_l1, sum(_l1(tau) for tau in held.values()), self.members)
            for key, tau in held.items():
                flat = self._output(key)
                for chunk in self._job(key).chunks():
                    flat[chunk.start : chunk.stop] = self._theta(chunk.base, tau[chunk.start : chunk.stop], key, alpha)
        else:
            for key, positions, base, value in undecided.resolved():
                flat = self.out[key].view(-1)
                flat[positions] = self._theta(base, value, key).to(flat.dtype)

    def _task_vector_sum(self, chunk: Chunk) -> torch.Tensor:
        """sum_i tau_i of the chunk over every member (for LiNeS' auto alpha), carried as state by an update."""
        if self.running is None:
            return sum_in_order(chunk.task_vectors(), out=chunk.buffer("engine.sum"))
        state = self.running.load(chunk, {AUTO_SUM_FIELD: "engine.sum"})
        for i, tau in enumerate(chunk.task_vectors()):
            fold_sum(state[AUTO_SUM_FIELD], tau, self.running.folded + i == 0)
        self.running.store(chunk, state)
        return state[AUTO_SUM_FIELD]

    def _thresholds(self, name: str, keys: list[str]) -> list[tuple]:
        """Per expert, the exact order statistics of |tau_i| over the group that the technique asks for."""
        if not self.technique.order_statistics:
            return [() for _ in self.experts]
        n = sum(self.base.entries[key].numel for key in keys)
        if n == 0:  # only zero-element tensors (scope="tensor"): nothing to trim, and no chunk reads a threshold
            self.bar.update(2 * len(keys))  # the two passes it skips
            return [() for _ in self.experts]
        try:
            ranks = self.technique.ranks(n)
        except ValueError as err:
            raise ValueError(f"{self.technique.name} over scope {name!r}: {err}") from None

        def magnitudes() -> Iterator[tuple[int, torch.Tensor]]:
            for key in keys:
                for chunk in self._job(key).chunks():
                    for i, tau in enumerate(chunk.task_vectors()):
                        yield i, tau.abs_()
                self.bar.update()

        self.bar.set_description(f"{self.technique.name}: order statistics {name}")
        return order_stats.largest(magnitudes, len(self.experts), ranks)

    def _output(self, key: str) -> torch.Tensor:
        entry = self.base.entries[key]
        self.out[key] = torch.empty(entry.shape, dtype=entry.dtype)
        return self.out[key].view(-1)

    def _theta(self, base: torch.Tensor, tau: torch.Tensor, key: str, alpha: float | None = None) -> torch.Tensor:
        """Weights for the output: the kernel's own for weight-space techniques, else theta_0 + s(key) * tau.

        Overwrites ``tau`` (the kernel's result, which nothing else holds) to save an allocation per chunk.
        """
        if self.technique.space == "weights":
            return tau
        scale = (self.scaling.alpha if alpha is None else alpha) + self.scaling.beta * self.ratios.get(key, 0.0)
        return tau.mul_(scale).add_(base)  # two roundings, no fused multiply-add


def _l1(tensor: torch.Tensor) -> float:
    return float(tensor.abs().sum(dtype=torch.float64))


class _Undecided:
    """TIES positions of one scope group whose elected sign was 0; resolved by the group's majority sign, or left at
    0 when the majority is 0 too (symmetric; the reference code would take the negative side, see ``ties``)."""

    def __init__(self) -> None:
        self.sign_sum = 0
        self.entries: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(self, chunk: Chunk, result: torch.Tensor | Elected) -> torch.Tensor:
        if not isinstance(result, Elected):
            return result
        self.sign_sum += result.sign_sum
        if len(result.undecided):
            base = chunk.base[result.undecided]
            self.entries.append((chunk.key, result.undecided + chunk.start, base, result.pos_mean, result.neg_mean))
        return result.tau

    def resolved(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(key, flat positions, base values, merged task-vector values) with the majority sign applied."""
        for key, positions, base, pos_mean, neg_mean in self.entries:
            value = pos_mean if self.sign_sum > 0 else neg_mean if self.sign_sum < 0 else torch.zeros_like(pos_mean)
            yield key, positions, base, value
