"""The loaders of one task (training) and of one evaluation dataset, built on the shard index.

A training loader is an epoch of exactly `steps_per_task` batches on every rank (docs/ARCHITECTURE.md decision 2):
sized, so Lightning knows where a task ends, and resumable through `state_dict()` = (task, batches consumed), which
Lightning stores in the fit loop of every checkpoint and hands back before the loader is iterated again. Batch i is a
pure function of (seed, task, i, rank layout): a worker builds whole batches, round-robin, so resuming at batch k only
changes where the workers start. Random crops and caption choices are seeded per sample from its place in the
*global* batch, so they do not depend on the number of ranks or workers either.

What a batch's `image` holds is the transform's and `collate`'s choice: float images from open_clip's transforms
(`data.images: host`), or uint8 crops and their geometry that the training device resamples
(`data.images: device`, `timelit.data.device_images`).
"""

from __future__ import annotations

import math
import random
import signal
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from timelit.data.device_images import stack_images
from timelit.data.mixture import _SOURCE_CODES, SourceSequence
from timelit.data.samples import Sample, decode, decode_image
from timelit.data.shards import CorruptSampleError, ShardIndex
from timelit.data.skips import Skip
from timelit.training.seeding import mix_seed, seed_torch_cpu

# Each worker of these IterableDatasets builds a disjoint set of whole batches, so their `__len__` is exact.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

OnCorrupt = Literal["skip", "raise"]
_POSITION_BITS = 40
_MAX_REPLACEMENTS = 16


def encode(index_number: int, positions: np.ndarray) -> np.ndarray:
    """Pack (which shard index, which sample) into one int64 so a source is a single array of candidates."""
    return (np.int64(index_number) << _POSITION_BITS) | positions.astype(np.int64)


def decode_id(sample_id: int) -> tuple[int, int]:
    return int(sample_id) >> _POSITION_BITS, int(sample_id) & ((1 << _POSITION_BITS) - 1)


def ignore_preemption_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the main process, which saves and requeues (PL#20280).

    The price: torch ends the workers of an iterator that is never garbage collected by the SIGTERM that Python's
    multiprocessing exit handler sends to daemonic children before it joins them. Ignored here, that join would wait
    forever, so the error path stops the workers explicitly (`StoppableLoader.shutdown_workers`).
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class SourcePart:
    """One source of a task as this rank sees it: its sequence, and its slice of every global batch."""

    name: str
    sequence: SourceSequence
    start: int
    per_batch: int
    rank_offset: int
    rank_count: int


class SampleReader:
    """Reads and decodes samples by id; a sample that does not decode is fatal, or skipped and listed in `skipped`.

    Nothing is logged here: a reader lives in every loader worker, and the main process reports each damaged sample
    or shard once for the whole run (timelit.data.skips, timelit.training.callbacks.skipped).
    """

    def __init__(
        self, indexes: list[ShardIndex], on_corrupt: OnCorrupt, image_decoder: Callable[[bytes], Any] = decode_image
    ):
        self.indexes = indexes
        self.on_corrupt = on_corrupt
        self.image_decoder = image_decoder
        self.skipped: list[Skip] = []

    def read(self, sample_id: int) -> Sample | None:
        number, position = decode_id(sample_id)
        index = self.indexes[number]
        try:
            return decode(index.read(position), self.image_decoder)
        except CorruptSampleError as error:
            if self.on_corrupt == "raise":
                raise
            shard, dataset = index.shards[int(index.shard[position])], index.directory.name
            self.skipped.append(Skip(dataset, index.split, shard, position, str(error), error.shard_problem))
            return None

    def take_skipped(self) -> list[Skip]:
        """The samples skipped since the last call (one batch's, as each worker builds whole batches)."""
        skipped, self.skipped = self.skipped, []
        return skipped


class TaskBatches(IterableDataset):
    """The training batches of one task for one rank; `len()` is the whole task even after a resume."""

    def __init__(
        self,
        task: int,
        steps: int,
        parts: list[SourcePart],
        reader: SampleReader,
        transform: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        seed: int,
        collate: Callable[[list[Any]], dict[str, torch.Tensor]] = stack_images,
    ):
        self.task, self.steps, self.parts = task, steps, parts
        self.reader, self.transform, self.tokenizer, self.seed = reader, transform, tokenizer, seed
        self.collate = collate
        self.start = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for batch_index in range(self.start + worker, self.steps, workers):
            yield self.batch(batch_index)

    def _fill_slot(self, part: SourcePart, position: int) -> Sample:
        # A corrupt sample is replaced by the same slot of the following passes: deterministic, so every run skips
        # the same samples and the batch keeps its size.
        for attempt in range(_MAX_REPLACEMENTS):
            sample_id = part.sequence.take(position + attempt * len(part.sequence), 1)[0]
            sample = self.reader.read(sample_id)
            if sample is not None:
                return sample
        raise CorruptSampleError(f"{_MAX_REPLACEMENTS} corrupt samples in a row in the {part.name} source")

    def batch(self, batch_index: int) -> dict[str, Any]:
        images, captions, sources, keys = [], [], [], []
        self.reader.take_skipped()  # a batch lists its own skips only
        with torch.random.fork_rng(devices=[]):
            for part in self.parts:
                first = part.start + batch_index * part.per_batch + part.rank_offset
                for slot in range(part.rank_count):
                    sample = self._fill_slot(part, first + slot)
                    slot_seed = mix_seed(
                        self.seed, self.task, batch_index, _SOURCE_CODES[part.name], part.rank_offset + slot
                    )
                    seed_torch_cpu(slot_seed)
                    images.append(self.transform(sample.image))
                    captions.append(sample.training_caption(random.Random(slot_seed)))
                    sources.append(_SOURCE_CODES[part.name])
                    keys.append(sample.key)
        return {
            **self.collate(images),
            "text": self.tokenizer(captions),
            "source": torch.tensor(sources, dtype=torch.int8),
            "keys": keys,
            "skipped": self.reader.take_skipped(),
        }


class StoppableLoader(DataLoader):
    """A DataLoader whose worker processes can be stopped by whoever built it, not only by whoever iterates it.

    Without persistent workers, torch's DataLoader keeps no reference to the iterator that owns its workers: they
    stop when that iterator is exhausted or garbage collected. After an exception the iterator lives on in the
    traceback until the interpreter exits, and our workers ignore the SIGTERM that would end them then
    (`ignore_preemption_signals`): the process hangs at exit. `TimeDataModule.on_exception` calls `shutdown_workers`.

    The loader holds its iterator weakly: Lightning leaves some evaluation iterators unfinished (it stops at their
    length), and a strong reference here would keep their workers alive into that same hang after a run that ended
    well.
    """

    _live: weakref.ref[Any] | None = None  # the iterator of the latest `__iter__`

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        iterator = super().__iter__()
        self._live = weakref.ref(iterator)
        return iterator

    def shutdown_workers(self) -> None:
        """Stop the workers of the latest iteration, if it has any: torch's own shutdown (a stop message, a join of
        up to 5 s each), then SIGKILL for a worker still busy, since the SIGTERM torch sends it is ignored."""
        iterator = self._live() if self._live is not None else None
        self._live = None
        if not isinstance(iterator, _MultiProcessingDataLoaderIter):
            return
        iterator._shutdown_workers()
        for worker in iterator._workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)


class TaskLoader(StoppableLoader):
    """A DataLoader over `TaskBatches` whose position survives a restart (Lightning's resumable-loader protocol)."""

    def __init__(self, batches: TaskBatches, **kwargs: Any):
        super().__init__(batches, batch_size=None, **kwargs)
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._yielded = self.dataset.start  # type: ignore[attr-defined]
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"task": self.dataset.task, "batches": self._yielded}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A checkpoint written at the end of a task carries that task's state; the loader of the next task starts at 0.
        if state.get("task") == self.dataset.task:  # type: ignore[attr-defined]
            self.dataset.start = int(state["batches"])  # type: ignore[attr-defined]


Scope = Literal["subset", "full"]


class EvalBatches(IterableDataset):
    """Batches of one evaluation dataset for one rank: the rank takes every world_size-th sample, no padding, so no
    sample is evaluated twice; workers take whole batches round-robin. It serves the fixed subset or the full split,
    whichever `use` chose last."""

    def __init__(
        self,
        dataset: str,
        task_type: Literal["classification", "retrieval"],
        index: ShardIndex,
        positions: dict[Scope, np.ndarray],
        batch_size: int,
        transform: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        on_corrupt: OnCorrupt,
        scope: Scope = "subset",
        image_decoder: Callable[[bytes], Any] = decode_image,
        collate: Callable[[list[Any]], dict[str, torch.Tensor]] = stack_images,
    ):
        self.dataset, self.task_type, self.index = dataset, task_type, index
        self.batch_size, self.transform, self.tokenizer = batch_size, transform, tokenizer
        self.reader = SampleReader([index], on_corrupt, image_decoder)
        self.collate = collate
        self.scoped_positions = positions
        self.use(scope)

    def use(self, scope: Scope) -> None:
        self.scope, self.positions = scope, self.scoped_positions[scope]

    @property
    def most_batches(self) -> int:
        """Batches of the larger scope (the loader is built before its scope is chosen)."""
        return max(math.ceil(len(p) / self.batch_size) for p in self.scoped_positions.values())

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for number in range(worker, len(self), workers):
            chunk = self.positions[number * self.batch_size : (number + 1) * self.batch_size]
            yield self.batch(chunk)

    def batch(self, chunk: np.ndarray) -> dict[str, Any]:
        images, labels, kept, captions, owners = [], [], [], [], []
        self.reader.take_skipped()
        for position in chunk:
            sample = self.reader.read(int(position))  # one shard index: the id is the position
            if sample is None:
                continue
            if self.task_type == "classification":
                label = self._class_label(sample)
            else:
                label = int(sample.meta.get("label", -1))  # unused: retrieval scores captions
            images.append(self.transform(sample.image))
            labels.append(label)
            kept.append(int(position))
            if self.task_type == "retrieval":
                captions.extend(sample.captions)
                owners.extend([int(position)] * len(sample.captions))
        batch: dict[str, Any] = {
            **self.collate(images),
            "label": torch.tensor(labels, dtype=torch.long),
            "position": torch.tensor(kept, dtype=torch.long),
            "skipped": self.reader.take_skipped(),
        }
        if self.task_type == "retrieval":
            batch["caption_tokens"] = self.tokenizer(captions) if captions else torch.empty(0, dtype=torch.long)
            batch["caption_owner"] = torch.tensor(owners, dtype=torch.long)
        return batch

    def _class_label(self, sample: Sample) -> int:
        """The sample's class index, checked here where its key is known: a missing or negative label used to fail
        deep inside the evaluator's `gather` without naming the dataset or the sample."""
        label = sample.meta.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            found = f"label {label!r}" if "label" in sample.meta else "no label"
            raise ValueError(
                f"evaluation dataset '{self.dataset}': sample '{sample.key}' has {found}; a classification sample "
                f"needs a label in 0..C-1, its index in the dataset's class list of C names (`timelit data verify` "
                f"checks the labels; `timelit data prepare` writes them)"
            )
        return label


class EvalLoader(StoppableLoader):
    """A DataLoader over `EvalBatches` that chooses subset or full split when it is iterated, not when it is built.

    Lightning keeps the sanity check's validation loaders for the first task's evaluation, so a choice made when the
    loader is built would evaluate the first task on the full splits. Workers are forked when iteration starts, so
    they see the choice.
    """

    def __init__(self, batches: EvalBatches, choose_scope: Callable[[], Scope], **kwargs: Any):
        super().__init__(batches, batch_size=None, **kwargs)
        self.choose_scope = choose_scope

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.dataset.use(self.choose_scope())  # type: ignore[attr-defined]
        return super().__iter__()


def eval_workers(num_workers: int, batches: int) -> int:
    """Workers for an evaluation loader of `batches` batches.

    A worker decodes whole batches, so workers beyond the number of batches sit idle, and a loader of one batch gains
    nothing from a worker but pays for forking it: on the quickstart (11 datasets of one or two batches) forking 2
    workers per loader made every evaluation 3-4 s slower than decoding in the main process. FoMo-in-Flux subsets
    are one or two batches of 512 for most of its 63 datasets, evaluated after every task.
    """
    return 0 if batches <= 1 else min(num_workers, batches)


def loader_kwargs(num_workers: int) -> dict[str, Any]:
    """Settings shared by every timelit loader."""
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": torch.cuda.is_available()}
    if num_workers > 0:
        kwargs.update(worker_init_fn=ignore_preemption_signals, prefetch_factor=2, persistent_workers=False)
    return kwargs
