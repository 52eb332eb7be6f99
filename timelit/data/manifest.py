"""Dataset manifests: what a benchmark's datasets are, checked before any data is read.

    python -c "from timelit.data.manifest import load_manifests; print(load_manifests('fomo_in_flux').summary())"

A manifest set is a folder:

    datasets/<NAME>.yaml      one per dataset: role, task type, class names, prompt templates, splits
    classnames/<NAME>.json    the class-name list of a dataset (index = label)
    streams/<stream>.json     task orders: JSON lists of "DATASET+++classname" concepts (FoMo-in-Flux format)
    pools/<POOL>.yaml         pretraining replay pools (image-text pairs without classes)

The shipped set `fomo_in_flux` is `data_manifests/` (data_manifests/README.md); `timelit data synth` writes a
set of the same shape for the quickstart benchmark. Every problem names the file and key at fault.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml

from timelit.utilities.errors import UserError
from timelit.utilities.resources import manifests_dir

Role = Literal["adapt", "eval"]
TaskType = Literal["classification", "retrieval"]

SHIPPED_SETS = {"fomo_in_flux": manifests_dir}
# Required keys: a manifest says what its classes are (or, for a retrieval set without classes, says so with
# `classnames: null` and `num_classes: null`), where the data comes from and under which terms.
_DATASET_KEYS = {"name", "role", "task", "classnames", "num_classes", "prompt_templates", "splits", "source", "license"}
_OPTIONAL_KEYS = {"citation", "notes"}
_SPLIT_KEYS = {"num_samples"}


class ManifestError(UserError, ValueError):
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
        """The label carrying `classname`, as a list (empty if none): the schema rejects a class list that repeats a
        name, so there is at most one. Matching is exact: QUILT's "... Infectious Disease" and "... disease" are two
        classes (which open_clip's lowercasing tokenizer cannot tell apart; see data_manifests/README.md)."""
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


def read_document(
    path: Path,
    expected: type,
    problem: str,
    syntax: Literal["JSON", "YAML"] = "JSON",
    error: type[Exception] = ManifestError,
    where: str | None = None,
) -> Any:
    """The JSON or YAML document in `path`, checked to be an `expected` at its top level.

    A file that does not parse, or holds something else, raises `error` naming the file (or `where`): `not valid
    JSON: <the parser's message>`, or `problem`, which says what a valid file holds.
    """
    where = where or str(path)
    text = path.read_text()
    try:
        data = yaml.safe_load(text) if syntax == "YAML" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as parse_error:
        raise error(f"{where}: not valid {syntax}: {parse_error}") from parse_error
    if not isinstance(data, expected):
        raise error(f"{where}: {problem}")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_document(path, dict, "expected a mapping at the top level", "YAML")


def _read_classnames(reference: str, manifest_path: Path) -> tuple[str, ...]:
    path = (manifest_path.parent / reference).resolve()
    where = f"{manifest_path}: key 'classnames' ({path})"
    if not path.is_file():
        raise ManifestError(f"{manifest_path}: key 'classnames' points to '{reference}', which does not exist ({path})")
    problem = "expected a JSON list of class-name strings"
    names = read_document(path, list, problem, where=where)
    if not all(isinstance(n, str) for n in names):
        raise ManifestError(f"{where}: {problem}")
    return tuple(names)


def _class_list(data: dict[str, Any], name: str, task: str, path: Path) -> tuple[str, ...]:
    """The class names, checked against `num_classes`; both keys are required so that a forgotten list is an error,
    not a dataset with no classes. Only a retrieval set may state `null` for both (each image is its own label)."""
    for key in ("classnames", "num_classes"):
        if key not in data:
            raise ManifestError(
                f"{path}: missing key '{key}' (a retrieval dataset without classes states 'classnames: null' and "
                f"'num_classes: null')"
            )
    reference, num_classes = data["classnames"], data["num_classes"]
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise ManifestError(f"{path}: key 'num_classes' must be an integer or null, got {num_classes!r}")
    if reference is None:
        if task != "retrieval":
            raise ManifestError(f"{path}: key 'classnames' is null, but a {task} dataset needs its class list")
        if num_classes is not None:
            raise ManifestError(f"{path}: key 'num_classes' is {num_classes} but key 'classnames' is null")
        return ()
    if not isinstance(reference, str):
        raise ManifestError(f"{path}: key 'classnames' must be a path to a JSON class list or null, got {reference!r}")
    classnames = _read_classnames(reference, path)
    if not classnames:
        raise ManifestError(
            f"{path}: key 'classnames' points to an empty class list ({reference}); only a retrieval dataset may have "
            f"no classes, and it states 'classnames: null'"
        )
    labels: dict[str, int] = {}
    for label, classname in enumerate(classnames):
        if classname in labels:
            # Exact duplicates only: a name repeated would make its concept ambiguous in a stream and its label
            # unreachable. Names equal after lowercasing (QUILT) are distinct classes of the release; see README.
            raise ManifestError(
                f"{path}: key 'classnames' ({reference}) of dataset '{name}' lists the class name {classname!r} twice "
                f"(labels {labels[classname]} and {label}); class names must be unique"
            )
        labels[classname] = label
    if num_classes is None:
        raise ManifestError(f"{path}: key 'num_classes' is null but the class list has {len(classnames)} names")
    if num_classes != len(classnames):
        raise ManifestError(
            f"{path}: key 'num_classes' is {num_classes} but the class list has {len(classnames)} names"
        )
    return classnames


def _prompt_templates(data: dict[str, Any], path: Path) -> tuple[str, ...]:
    """Templates with exactly one `{}`: `template.format(classname)` must put the class name in once, and a stray
    field (`{name}`, a second `{}`, a lone brace) would fail or garble every prompt at evaluation time."""
    templates = _require(data, "prompt_templates", list, path)
    if not templates:
        raise ManifestError(f"{path}: key 'prompt_templates' must be a non-empty list of strings containing '{{}}'")
    for number, template in enumerate(templates):
        where = f"{path}: key 'prompt_templates[{number}]'"
        if not isinstance(template, str):
            raise ManifestError(f"{where} must be a string, got {template!r}")
        try:
            fields = [parsed[1:] for parsed in string.Formatter().parse(template) if parsed[1] is not None]
        except ValueError as error:
            raise ManifestError(
                f"{where} is {template!r}, not a format string ({error}); write a literal brace as '{{{{' or '}}}}'"
            ) from error
        if fields != [("", "", None)]:
            raise ManifestError(
                f"{where} is {template!r}: a template needs exactly one '{{}}' where the class name goes and no "
                f"other field"
            )
    return tuple(templates)


def _splits(data: dict[str, Any], role: str, path: Path) -> dict[str, SplitInfo]:
    splits_raw = _require(data, "splits", dict, path)
    splits = {}
    for split, info in splits_raw.items():
        if not isinstance(info, dict):
            raise ManifestError(
                f"{path}: key 'splits.{split}' must be a mapping such as {{num_samples: null}}, got {info!r}"
            )
        unknown = set(info) - _SPLIT_KEYS
        if unknown:
            raise ManifestError(f"{path}: key 'splits.{split}' has unknown keys {sorted(unknown)}; valid: num_samples")
        count = info.get("num_samples")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise ManifestError(f"{path}: key 'splits.{split}.num_samples' must be a non-negative integer or null")
        splits[split] = SplitInfo(num_samples=count)
    for required in ("test",) if role == "eval" else ("train", "test"):
        if required not in splits:
            raise ManifestError(f"{path}: a dataset with role '{role}' needs key 'splits.{required}'")
    return splits


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
    classnames = _class_list(data, name, task, path)
    templates = _prompt_templates(data, path)
    splits = _splits(data, role, path)
    source = _require(data, "source", dict, path)
    license_ = _require(data, "license", str, path)
    if not license_.strip():
        raise ManifestError(f"{path}: key 'license' is empty; state the dataset's terms (or where to find them)")
    return DatasetManifest(
        name=name,
        role=role,  # type: ignore[arg-type]
        task=task,  # type: ignore[arg-type]
        classnames=classnames,
        prompt_templates=templates,
        splits=splits,
        path=path,
        source=source,
        license=license_,
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

    @property
    def shipped(self) -> bool:
        """Whether this is the FoMo-in-Flux set shipped with timelit (data_manifests/)."""
        return self.root.resolve() == manifests_dir().resolve()

    def dataset(self, name: str) -> DatasetManifest:
        if name not in self.datasets:
            raise ManifestError(_unknown("dataset", name, self.datasets, self.root / "datasets", self.shipped))
        return self.datasets[name]

    def pool(self, name: str) -> PoolManifest:
        if name not in self.pools:
            raise ManifestError(_unknown("pretraining pool", name, self.pools, self.root / "pools", self.shipped))
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


def _unknown(kind: str, name: str, known: dict[str, Any], where: Path, shipped: bool = False) -> str:
    """The error for a name the set lacks: the nearest names, and for the shipped set (where a forgotten
    `--manifests` leads) how to point at one's own set."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if shipped:
        return (
            f"unknown {kind} '{name}' in {where} (the shipped FoMo-in-Flux set).{hint} Pass --manifests DIR for "
            f"your own manifest set (`timelit data new` writes one; docs/own_data.md)."
        )
    return f"unknown {kind} '{name}' (not in {where}).{hint}"


def names(value: list[str] | str | None) -> list[str] | None:
    """Dataset, pool or split names as a command line gives them: a list (`[A,B]`), one name without brackets (`A`)
    or names separated by commas (`A,B`)."""
    if value is None or isinstance(value, list):
        return value
    return [part.strip() for part in value.strip().strip("[]").split(",") if part.strip()]


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
