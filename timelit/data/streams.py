"""Streams: the order in which concepts arrive, cut into tasks.

    python -c "from timelit.data.streams import *; print(load_stream('debug_seq_small', 'fomo_in_flux', 5).sizes)"

A stream is a JSON list of unique `DATASET+++classname` concepts (the FoMo-in-Flux format, e.g.
`"CIFAR100+++apple"`). It is cut into T contiguous tasks of near-equal size; as in the reference pipeline the first
`len(stream) % T` tasks get one concept more (18,381 concepts / 20 tasks = 919, the first task 920). A task's data is
every training sample of its concepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from timelit.data.manifest import ManifestError, ManifestSet, load_manifests, read_document

SEPARATOR = "+++"


@dataclass(frozen=True)
class Concept:
    dataset: str
    classname: str

    def __str__(self) -> str:
        return f"{self.dataset}{SEPARATOR}{self.classname}"


def parse_concepts(entries: list[str], source: str | Path) -> list[Concept]:
    """Parse `DATASET+++classname` strings; duplicates and malformed entries name their position in `source`."""
    concepts, seen = [], set()
    for position, entry in enumerate(entries):
        if not isinstance(entry, str) or SEPARATOR not in entry:
            raise ManifestError(
                f"{source}: entry {position} ({entry!r}) is not of the form 'DATASET{SEPARATOR}classname'"
            )
        dataset, classname = entry.split(SEPARATOR, 1)
        if entry in seen:
            raise ManifestError(f"{source}: concept '{entry}' appears twice (again at entry {position})")
        seen.add(entry)
        concepts.append(Concept(dataset, classname))
    return concepts


def chunk(items: list, num_tasks: int) -> list[list]:
    """Cut into `num_tasks` contiguous chunks; the first `len % num_tasks` chunks are one longer."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    if len(items) < num_tasks:
        raise ValueError(f"cannot cut {len(items)} concepts into {num_tasks} tasks: every task needs a concept")
    size, extra = divmod(len(items), num_tasks)
    chunks, start = [], 0
    for task in range(num_tasks):
        stop = start + size + (1 if task < extra else 0)
        chunks.append(items[start:stop])
        start = stop
    return chunks


@dataclass(frozen=True)
class Stream:
    """A stream resolved against its manifests: for each task, the labels of each dataset it brings."""

    name: str
    tasks: list[list[Concept]]
    labels: list[dict[str, frozenset[int]]]

    @property
    def sizes(self) -> list[int]:
        return [len(task) for task in self.tasks]

    @property
    def datasets(self) -> list[str]:
        """Datasets in order of first appearance."""
        order: dict[str, None] = {}
        for task in self.tasks:
            for concept in task:
                order.setdefault(concept.dataset, None)
        return list(order)

    @property
    def task_datasets(self) -> list[list[str]]:
        """For each task, the datasets its concepts come from (results.json's `run.data.task_datasets`, from which
        the forgetting matrix finds each dataset's own task)."""
        return [list(dict.fromkeys(concept.dataset for concept in task)) for task in self.tasks]


def resolve(concepts: list[Concept], manifests: ManifestSet, source: str | Path) -> dict[str, frozenset[int]]:
    """Map concepts to the labels they select, per dataset; unknown datasets, classes and held-out sets are errors."""
    labels: dict[str, set[int]] = {}
    for concept in concepts:
        try:
            manifest = manifests.dataset(concept.dataset)
        except ManifestError as error:
            raise ManifestError(f"{source}: concept '{concept}': {error}") from None
        if manifest.role != "adapt":
            raise ManifestError(f"{source}: concept '{concept}' comes from held-out dataset '{manifest.name}'")
        found = manifest.labels_of(concept.classname)
        if not found:
            raise ManifestError(
                f"{source}: concept '{concept}': dataset '{manifest.name}' has no class '{concept.classname}' "
                f"(its class list: {manifest.path})"
            )
        labels.setdefault(concept.dataset, set()).update(found)
    return {name: frozenset(found) for name, found in labels.items()}


def by_dataset(concepts: list[Concept], num_tasks: int, source: str | Path) -> list[list[Concept]]:
    """Tasks that start only where the dataset changes: the pipeline's `dataset_incremental` tasks.

    With as many tasks as runs of consecutive concepts of one dataset, each task is one dataset; with a divisor of
    that count, each task is that many consecutive datasets (12 datasets in 4 tasks: three per task), so one stream
    serves both horizons of a study at the same total budget.
    """
    runs: list[list[Concept]] = []
    for concept in concepts:
        if not runs or runs[-1][-1].dataset != concept.dataset:
            runs.append([])
        runs[-1].append(concept)
    if num_tasks < 1 or len(runs) % num_tasks:
        counts = [n for n in range(1, len(runs) + 1) if len(runs) % n == 0]
        raise ManifestError(
            f"{source}: the stream holds {len(runs)} dataset(s) in a row, which cannot be cut at dataset changes "
            f"into {num_tasks} tasks of equally many datasets: num_tasks must be one of {counts}"
        )
    per_task = len(runs) // num_tasks
    return [[c for run in runs[t * per_task : (t + 1) * per_task] for c in run] for t in range(num_tasks)]


def load_stream(
    stream: str | Path,
    manifests: str | Path | ManifestSet,
    num_tasks: int,
    boundaries: Literal["equal", "dataset"] = "equal",
) -> Stream:
    """Read a stream (a path, or a name in the manifest set's `streams/`), check it and cut it into tasks.

    `equal` cuts it into `num_tasks` chunks of near-equal concept counts (the reference); `dataset` starts a new task
    wherever the dataset changes (dataset-incremental streams).
    """
    manifest_set = manifests if isinstance(manifests, ManifestSet) else load_manifests(manifests)
    path = manifest_set.stream_path(str(stream))
    entries = read_document(path, list, f"a stream is a JSON list of 'DATASET{SEPARATOR}classname' strings")
    concepts = parse_concepts(entries, path)
    tasks = chunk(concepts, num_tasks) if boundaries == "equal" else by_dataset(concepts, num_tasks, path)
    return Stream(name=path.stem, tasks=tasks, labels=[resolve(task, manifest_set, path) for task in tasks])
