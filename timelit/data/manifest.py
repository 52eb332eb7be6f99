"""Dataset manifests: what a benchmark's datasets are, checked before any data is read.

    python -c "from timelit.data.manifest import load_manifests; print(load_manifests('fomo_in_flux').summary())"

A manifest set is a folder:

    datasets/<NAME>.yaml      one per dataset: role, task type, class names, prompt templates, splits
    classnames/<NAME>.json    the class-name list of a dataset (index = label)
    streams/<stream>.json     task orders: JSON lists of "DATASET+++classname" concepts (FoMo-in-Flux format)
    pools/<POOL>.yaml         pretraining replay pools (image-text pairs without classes)

The shipped set `fomo_in_flux` is `data_manifests/` (ARCHITECTURE.md, "Data flow"); `timelit data synth` writes a
set of the same shape for the quickstart benchmark. Every problem names the file and key at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml

from timelit.resources import manifests_dir

Role = Literal["adapt", "eval"]
TaskType = Literal["classification", "retrieval"]

SHIPPED_SETS = {"fomo_in_flux": manifests_dir}
_DATASET_KEYS = {"name", "role", "task", "classnames", "num_classes", "prompt_templates", "splits"}
_OPTIONAL_KEYS = {"source", "license", "citation", "notes"}


class ManifestError(ValueError):
    """A manifest is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class SplitInfo:
    """A split of a dataset; `num_samples` is None when the release does not state it (checked after prepare)."""

    num_samples: int | None = None


@dataclass(frozen=True)
class DatasetManifest:
    """One dataset of a benchmark.

    `role` decides which summary a dataset counts in: `adapt` datasets are streamed and make up A_KA, `eval`
    datasets are held out and make up A_ZS (FoMo-in-Flux: 41 and 22).
    """

    name: str
    role: Role
    task: TaskType
    classnames: tuple[str, ...]
    prompt_templates: tuple[str, ...]
    splits: dict[str, SplitInfo]
    path: Path
    source: dict[str, Any] = field(default_factory=dict)
    license: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def labels_of(self, classname: str) -> list[int]:
        """Every label carrying `classname` (a list may repeat a name; none of the shipped ones does)."""
        return self._labels_by_name.get(classname, [])

    @cached_property
    def _labels_by_name(self) -> dict[str, list[int]]:
        # Resolving the 18,381 concepts of a FoMo-in-Flux stream by linear scans took about 2 s per run and rank.
        by_name: dict[str, list[int]] = {}
        for label, name in enumerate(self.classnames):
            by_name.setdefault(name, []).append(label)
        return by_name


@dataclass(frozen=True)
class PoolManifest:
    """A pretraining replay pool: image-text pairs, sampled without regard to classes."""

    name: str
    num_samples: int | None
    path: Path
    source: dict[str, Any] = field(default_factory=dict)
    license: str | None = None


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing key '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}: key '{key}' must be {names}, got {value!r}")
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ManifestError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level")
    return data


def _read_classnames(reference: str, manifest_path: Path) -> tuple[str, ...]:
    path = (manifest_path.parent / reference).resolve()
    if not path.is_file():
        raise ManifestError(f"{manifest_path}: key 'classnames' points to '{reference}', which does not exist ({path})")
    names = json.loads(path.read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ManifestError(f"{path}: expected a JSON list of class-name strings")
    return tuple(names)


def parse_dataset_manifest(path: Path) -> DatasetManifest:
    """Parse and check one `datasets/<NAME>.yaml`."""
    data = _read_yaml(path)
    unknown = set(data) - _DATASET_KEYS - _OPTIONAL_KEYS
    if unknown:
        raise ManifestError(
            f"{path}: unknown keys {sorted(unknown)}; valid keys: {sorted(_DATASET_KEYS | _OPTIONAL_KEYS)}"
        )
    name = _require(data, "name", str, path)
    if name != path.stem:
        raise ManifestError(f"{path}: key 'name' is '{name}' but the file is named '{path.stem}.yaml'")
    role = _require(data, "role", str, path)
    if role not in ("adapt", "eval"):
        raise ManifestError(f"{path}: key 'role' must be 'adapt' or 'eval', got '{role}'")
    task = _require(data, "task", str, path)
    if task not in ("classification", "retrieval"):
        raise ManifestError(f"{path}: key 'task' must be 'classification' or 'retrieval', got '{task}'")
    classnames: tuple[str, ...] = ()
    if data.get("classnames") is not None:
        classnames = _read_classnames(_require(data, "classnames", str, path), path)
    elif task == "classification":
        raise ManifestError(f"{path}: a classification dataset needs key 'classnames'")
    num_classes = data.get("num_classes")
    if num_classes is not None and num_classes != len(classnames):
        raise ManifestError(
            f"{path}: key 'num_classes' is {num_classes} but the class list has {len(classnames)} names"
        )
    templates = _require(data, "prompt_templates", list, path)
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ManifestError(f"{path}: key 'prompt_templates' must be a non-empty list of strings containing '{{}}'")
    splits_raw = _require(data, "splits", dict, path)
    splits = {}
    for split, info in splits_raw.items():
        count = (info or {}).get("num_samples")
        if count is not None and (not isinstance(count, int) or count < 0):
            raise ManifestError(f"{path}: key 'splits.{split}.num_samples' must be a non-negative integer or null")
        splits[split] = SplitInfo(num_samples=count)
    for required in ("test",) if role == "eval" else ("train", "test"):
        if required not in splits:
            raise ManifestError(f"{path}: a dataset with role '{role}' needs key 'splits.{required}'")
    return DatasetManifest(
        name=name,
        role=role,  # type: ignore[arg-type]
        task=task,  # type: ignore[arg-type]
        classnames=classnames,
        prompt_templates=tuple(templates),
        splits=splits,
        path=path,
        source=data.get("source") or {},
        license=data.get("license"),
    )


def parse_pool_manifest(path: Path) -> PoolManifest:
    """Parse and check one `pools/<NAME>.yaml`."""
    data = _read_yaml(path)
    name = _require(data, "name", str, path)
    if name != path.stem:
        raise ManifestError(f"{path}: key 'name' is '{name}' but the file is named '{path.stem}.yaml'")
    count = data.get("num_samples")
    if count is not None and not isinstance(count, int):
        raise ManifestError(f"{path}: key 'num_samples' must be an integer or null")
    return PoolManifest(
        name=name, num_samples=count, path=path, source=data.get("source") or {}, license=data.get("license")
    )


@dataclass(frozen=True)
class ManifestSet:
    """Every dataset, pool and stream of one benchmark."""

    root: Path
    datasets: dict[str, DatasetManifest]
    pools: dict[str, PoolManifest]

    def dataset(self, name: str) -> DatasetManifest:
        if name not in self.datasets:
            raise ManifestError(_unknown("dataset", name, self.datasets, self.root / "datasets"))
        return self.datasets[name]

    def pool(self, name: str) -> PoolManifest:
        if name not in self.pools:
            raise ManifestError(_unknown("pretraining pool", name, self.pools, self.root / "pools"))
        return self.pools[name]

    def by_role(self, role: Role) -> list[DatasetManifest]:
        return [m for m in self.datasets.values() if m.role == role]

    def stream_path(self, stream: str) -> Path:
        """A stream given as a path, or by name from this set's `streams/` folder."""
        path = Path(stream).expanduser()
        if path.is_file():
            return path
        candidate = self.root / "streams" / (stream if stream.endswith(".json") else f"{stream}.json")
        if candidate.is_file():
            return candidate
        names = sorted(p.stem for p in (self.root / "streams").glob("*.json"))
        raise ManifestError(f"stream '{stream}' is neither a file nor a stream of {self.root / 'streams'}: {names}")

    def summary(self) -> str:
        adapt, held_out = self.by_role("adapt"), self.by_role("eval")
        return f"{self.root}: {len(adapt)} adaptation + {len(held_out)} held-out datasets, {len(self.pools)} pools"


def _unknown(kind: str, name: str, known: dict[str, Any], where: Path) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} '{name}' (not in {where}).{hint}"


def resolve_manifest_root(manifests: str | Path) -> Path:
    """A shipped set name (`fomo_in_flux`) or a folder."""
    if str(manifests) in SHIPPED_SETS:
        return SHIPPED_SETS[str(manifests)]()
    root = Path(manifests).expanduser()
    if not (root / "datasets").is_dir():
        raise ManifestError(
            f"manifests '{manifests}' is neither a shipped set ({sorted(SHIPPED_SETS)}) nor a folder with a "
            f"'datasets/' subfolder"
        )
    return root


def load_manifests(manifests: str | Path) -> ManifestSet:
    """Load and check a whole manifest set; duplicate names across files are an error."""
    root = resolve_manifest_root(manifests)
    datasets: dict[str, DatasetManifest] = {}
    for path in sorted((root / "datasets").glob("*.yaml")):
        manifest = parse_dataset_manifest(path)
        if manifest.name in datasets:
            raise ManifestError(f"{path}: dataset '{manifest.name}' is also defined in {datasets[manifest.name].path}")
        datasets[manifest.name] = manifest
    pools = {}
    for path in sorted((root / "pools").glob("*.yaml")) if (root / "pools").is_dir() else []:
        pool = parse_pool_manifest(path)
        if pool.name in datasets:
            raise ManifestError(f"{path}: pool '{pool.name}' has the name of a dataset")
        pools[pool.name] = pool
    if not datasets:
        raise ManifestError(f"{root / 'datasets'}: no dataset manifests (*.yaml) found")
    return ManifestSet(root=root, datasets=datasets, pools=pools)
