"""Stream generators: the concept orders researchers use, written in the FoMo-in-Flux stream format.

    timelit data stream --out my_stream.json --ordering random --seed 3

A stream is a JSON list of `DATASET+++classname` concepts (`timelit.data.streams`); the data module cuts it into T
contiguous tasks. The orderings:

* `random` — every concept in a seeded random order (FoMo-in-Flux `random_sequence_*`);
* `dataset_incremental` — datasets one after another, in a given order or a seeded shuffle, each dataset's classes in
  class-list order (`shuffle_classes=True` shuffles them within the dataset);
* `class_incremental` — every dataset is learned class by class over the whole stream: each dataset's classes, in a
  seeded order, are spread evenly along the stream, so every task holds about 1/T of the classes of every dataset.

The concepts come from the adaptation datasets' class lists, or from an existing stream (`universe`): FoMo-in-Flux's
streams leave out 44 of the 18,425 listed classes (CLEVR streams 217 of its 247, OPENIMAGES 579 of 589, MITSTATES
1959 of 1962, QUILT 156 of 157), so `universe="random_sequence_1"` reorders exactly the benchmark's 18,381 concepts.
Every generated stream is checked against the manifests with `check_stream` (the data module's own check,
`timelit.data.streams.resolve`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from timelit.data.manifest import ManifestError, ManifestSet, load_manifests
from timelit.data.streams import SEPARATOR, Concept, parse_concepts, resolve
from timelit.utilities.atomic import write_text

Ordering = Literal["random", "dataset_incremental", "class_incremental"]


def check_stream(stream: str | Path | list[str], manifests: str | Path | ManifestSet) -> list[Concept]:
    """Parse a stream (a path, a name in the manifest set's `streams/`, or a list of concept strings) and reject it
    if it names a dataset or class the manifests lack, a held-out dataset, or a concept twice."""
    manifest_set = manifests if isinstance(manifests, ManifestSet) else load_manifests(manifests)
    if isinstance(stream, list):
        entries, source = stream, "<stream>"
    else:
        path = manifest_set.stream_path(str(stream))
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ManifestError(f"{path}: not valid JSON: {error}") from error
        source = str(path)
        if not isinstance(entries, list):
            raise ManifestError(f"{path}: a stream is a JSON list of 'DATASET{SEPARATOR}classname' strings")
    concepts = parse_concepts(entries, source)
    resolve(concepts, manifest_set, source)
    return concepts


def concepts_by_dataset(
    manifests: ManifestSet, datasets: list[str] | None = None, universe: str | Path | None = None
) -> dict[str, list[str]]:
    """Class names per adaptation dataset, in class-list order; restricted to the concepts of `universe` if given."""
    names = datasets if datasets is not None else sorted(m.name for m in manifests.by_role("adapt"))
    chosen = {}
    for name in names:
        manifest = manifests.dataset(name)
        if manifest.role != "adapt":
            raise ManifestError(
                f"dataset '{name}' is held out (role eval, {manifest.path}); streams hold adapt datasets"
            )
        chosen[name] = list(dict.fromkeys(manifest.classnames))
    if universe is not None:
        allowed = {(c.dataset, c.classname) for c in check_stream(str(universe), manifests)}
        chosen = {name: [c for c in classes if (name, c) in allowed] for name, classes in chosen.items()}
    empty = [name for name, classes in chosen.items() if not classes]
    if empty:
        raise ManifestError(f"datasets {empty} have no classes to stream (not in the universe stream?)")
    return chosen


def _dataset_order(names: list[str], dataset_order: list[str] | None, seed: int | None) -> list[str]:
    """The order datasets enter the stream: `dataset_order` if given, else sorted names shuffled by `seed` (if any).

    A given order must name every dataset of the stream once: a dataset it leaves out would silently vanish from the
    stream, and one it adds would have no concepts.
    """
    if dataset_order is not None:
        missing = [n for n in names if n not in dataset_order]
        extra = [n for n in dataset_order if n not in names]
        repeated = sorted({n for n in dataset_order if dataset_order.count(n) > 1})
        if missing or extra or repeated:
            problems = {"missing": missing, "not among the stream's datasets": extra, "repeated": repeated}
            raise ManifestError(
                f"dataset_order {dataset_order} must list each dataset of the stream {sorted(names)} exactly once: "
                + "; ".join(f"{label} {found}" for label, found in problems.items() if found)
            )
        return list(dataset_order)
    order = sorted(names)
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def random_order(concepts: dict[str, list[str]], seed: int) -> list[Concept]:
    out = [Concept(name, c) for name, classes in concepts.items() for c in classes]
    random.Random(seed).shuffle(out)
    return out


def dataset_incremental_order(
    concepts: dict[str, list[str]],
    dataset_order: list[str] | None = None,
    seed: int | None = None,
    shuffle_classes: bool = False,
) -> list[Concept]:
    """Datasets one after another (given order, else a shuffle by `seed`, else by name); `shuffle_classes` shuffles
    each dataset's classes by `seed`, which it therefore needs (`random.Random(None)` would seed from the OS and give a
    different stream on every call)."""
    if shuffle_classes and seed is None:
        raise ManifestError("dataset_incremental with shuffle_classes=True needs a seed")
    rng = random.Random(seed)
    out = []
    for name in _dataset_order(list(concepts), dataset_order, seed):
        classes = list(concepts[name])
        if shuffle_classes:
            rng.shuffle(classes)
        out += [Concept(name, c) for c in classes]
    return out


def class_incremental_order(
    concepts: dict[str, list[str]], seed: int, dataset_order: list[str] | None = None
) -> list[Concept]:
    """Each dataset's classes (shuffled by `seed`) spread evenly over the stream: concept j of a dataset with n
    classes sits at relative position (j + 0.5) / n; ties keep the dataset order."""
    rng = random.Random(seed)
    order = _dataset_order(list(concepts), dataset_order, None)
    placed = []
    for rank, name in enumerate(order):
        classes = list(concepts[name])
        rng.shuffle(classes)
        placed += [((j + 0.5) / len(classes), rank, Concept(name, c)) for j, c in enumerate(classes)]
    return [concept for _, _, concept in sorted(placed, key=lambda item: (item[0], item[1]))]


def generate_stream(
    ordering: Ordering,
    manifests: str | Path | ManifestSet = "fomo_in_flux",
    seed: int = 0,
    datasets: list[str] | None = None,
    dataset_order: list[str] | None = None,
    universe: str | None = None,
    shuffle_classes: bool = False,
) -> list[str]:
    """A checked stream as a list of `DATASET+++classname` strings."""
    if dataset_order is not None and ordering == "random":
        raise ManifestError(
            "dataset_order orders dataset_incremental and class_incremental streams; a random stream has none "
            "(restrict its datasets with `datasets`)"
        )
    manifest_set = manifests if isinstance(manifests, ManifestSet) else load_manifests(manifests)
    names = datasets if datasets is not None else dataset_order
    concepts = concepts_by_dataset(manifest_set, names, universe)
    if ordering == "random":
        order = random_order(concepts, seed)
    elif ordering == "dataset_incremental":
        # The seed always travels: a given dataset_order makes it irrelevant to the dataset order, not to the classes.
        order = dataset_incremental_order(concepts, dataset_order, seed, shuffle_classes)
    elif ordering == "class_incremental":
        order = class_incremental_order(concepts, seed, dataset_order)
    else:
        raise ManifestError(f"unknown ordering '{ordering}'; choose random, dataset_incremental or class_incremental")
    entries = [str(concept) for concept in order]
    check_stream(entries, manifest_set)
    return entries


def write_stream(entries: list[str], path: str | Path) -> Path:
    """Write a stream JSON atomically (one concept per line, like the FoMo-in-Flux files)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(entries, indent=0, ensure_ascii=False) + "\n")
    return path
