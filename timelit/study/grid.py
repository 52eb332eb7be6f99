"""Sweep grids: the YAML files of configs/sweeps/, read and checked (the format: docs/ARCHITECTURE.md, "A sweep
grid").

    load_grid(find_grid("scaling"))     configs/sweeps/scaling.yaml as a Grid

A grid names base configs and axes; each axis value adds config fragments and `--key=value` overrides. Every error
names the file and the key (`GridError`, a user error: one line, exit status 2). Expanding a grid into runs is
timelit/study/plan.py.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from timelit.utilities.errors import UserError, did_you_mean, yaml_problem
from timelit.utilities.resources import configs_dir

GRID_KEYS = ("name", "description", "configs", "overrides", "axes", "exclude", "sbatch", "resources", "signal_seconds")

# sbatch options timelit sets itself, with their short forms and why a user's would break the sweep.
_RESERVED_SBATCH = {
    "--job-name": ("-J", "timelit names the job timelit-<sweep>-<hash>: squeue finds the sweep's queued tasks by it"),
    "--array": ("-a", "timelit sets it to the unfinished points; choose points with --only"),
}
_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


class GridError(UserError, ValueError):
    """A sweep grid that cannot be expanded; the message names the file and the key."""


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis: its name in point names, and what it adds to the command line."""

    name: str
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    items: tuple[tuple[str, str], ...] = ()  # ("config" | "override", text) in the grid's order


@dataclass
class Grid:
    name: str
    path: Path
    configs: list[str]
    overrides: list[str]
    axes: dict[str, list[AxisValue]]
    exclude: list[dict[str, str]] = field(default_factory=list)
    sbatch: list[str] = field(default_factory=list)
    resources: dict[str, list[str]] = field(default_factory=dict)
    signal_seconds: int | None = None

    def sbatch_for(self, point: str) -> list[str]:
        """The grid's sbatch options for one point: `sbatch:`, then the first `resources:` entry matching its name."""
        extra = next((opts for pattern, opts in self.resources.items() if fnmatch.fnmatchcase(point, pattern)), [])
        return merge_sbatch_options([*self.sbatch, *extra])


def merge_sbatch_options(options: list[str]) -> list[str]:
    """One `--name=value` per name, the last value winning (as sbatch itself would take it), in first-seen order,
    so that `sbatch:`, `resources:` and `--sbatch` compose into a command a reader can check."""
    merged: dict[str, str] = {}
    for option in options:
        key = option.split("=", 1)[0] if option.startswith("--") and "=" in option else option
        merged[key] = option
    return list(merged.values())


def find_grid(grid: str) -> Path:
    """A grid given as a path, or as the name of a shipped one (`model_size` -> configs/sweeps/model_size.yaml)."""
    path = Path(grid).expanduser()
    if path.is_file():
        return path
    sweeps = configs_dir() / "sweeps"
    for candidate in (sweeps / grid, sweeps / f"{grid}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in sweeps.glob("*.yaml")) if sweeps.is_dir() else []
    raise FileNotFoundError(
        f"sweep grid '{grid}' is neither a file nor a shipped grid{did_you_mean(grid, available, n=1)}; shipped: "
        f"{', '.join(available)}"
    )


def override(text: str, where: str) -> str:
    """`--a.b=c` as is; `--a.b c` (one YAML string) -> `--a.b=c`."""
    if not text.startswith("--") or len(text) < 3:
        raise GridError(f"{where}: '{text}' is not an override (`--key=value`)")
    if "=" not in text.split(" ", 1)[0] and " " in text:
        key, value = text.split(" ", 1)
        return f"{key}={value.strip()}"
    return text


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _items(raw: Any, where: str) -> list[tuple[str, str]]:
    """A value's contents: config files (strings), overrides (`--...` strings) or `{dotted.key: value}` maps."""
    raw = raw if isinstance(raw, list) else [raw]
    items: list[tuple[str, str]] = []
    for entry in raw:
        if isinstance(entry, str) and entry.startswith("--"):
            items.append(("override", override(entry, where)))
        elif isinstance(entry, str):
            items.append(("config", entry))
        elif isinstance(entry, dict):
            items += [("override", f"--{key}={_scalar(value)}") for key, value in entry.items()]
        else:
            raise GridError(f"{where}: {entry!r} is neither a config file, an override nor a {{key: value}} map")
    return items


def _value_name(name: Any, where: str) -> str:
    text = _scalar(name)
    if not _NAME.match(text):
        raise GridError(f"{where}: value name '{text}' must use only letters, digits and . _ + - (it names folders)")
    return text


def _axis(axis: str, raw: Any, where: str) -> list[AxisValue]:
    where = f"{where}: axes.{axis}"
    if isinstance(raw, dict) and set(raw) == {"key", "values"}:
        values = raw["values"] if isinstance(raw["values"], list) else [raw["values"]]
        return [AxisValue(_value_name(v, where), items=(("override", f"--{raw['key']}={_scalar(v)}"),)) for v in values]
    if isinstance(raw, list):
        if not all(isinstance(entry, str) and not entry.startswith("--") for entry in raw):
            raise GridError(f"{where}: a list axis holds config files only; use `name: [items]` for overrides")
        return [AxisValue(_value_name(Path(entry).stem, where), items=(("config", entry),)) for entry in raw]
    if isinstance(raw, dict) and raw:
        return [AxisValue(_value_name(name, where), items=tuple(_items(v, where))) for name, v in raw.items()]
    raise GridError(
        f"{where} must be a map of value name -> configs/overrides, a list of config files, or {{key, values}}"
    )


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (see the module docstring for the format)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise GridError(f"{path}: not valid YAML: {yaml_problem(error)}") from error
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a sweep grid is a YAML map with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(GRID_KEYS)}")
    name = _value_name(raw.get("name") or path.stem, f"{path}: name")
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise GridError(f"{path}: `axes` must map at least one axis name to its values")
    axes = {_value_name(axis, f"{path}: axes"): _axis(axis, values, str(path)) for axis, values in axes_raw.items()}
    for axis, values in axes.items():
        names = [v.name for v in values]
        if len(set(names)) != len(names):
            raise GridError(f"{path}: axes.{axis} has repeated value names: {names}")
    exclude = []
    for rule in raw.get("exclude") or []:
        if not isinstance(rule, dict) or not set(rule) <= set(axes):
            raise GridError(f"{path}: exclude rule {rule!r} must map axis names ({', '.join(axes)}) to value names")
        exclude.append({axis: _scalar(value) for axis, value in rule.items()})
    configs = raw.get("configs") or []
    overrides = [override(o, f"{path}: overrides") for o in raw.get("overrides") or []]
    sbatch = check_sbatch_options([str(option) for option in raw.get("sbatch") or []], f"{path}: sbatch")
    resources_raw = raw.get("resources") or {}
    if not isinstance(resources_raw, dict) or not all(isinstance(v, list) for v in resources_raw.values()):
        raise GridError(f"{path}: `resources` must map point-name patterns (`model=ViT-H-14,*`) to sbatch option lists")
    resources = {
        str(pattern): check_sbatch_options([str(o) for o in options], f"{path}: resources.{pattern}")
        for pattern, options in resources_raw.items()
    }
    signal_seconds = raw.get("signal_seconds")
    if signal_seconds is not None and (isinstance(signal_seconds, bool) or not isinstance(signal_seconds, int)):
        raise GridError(f"{path}: signal_seconds must be a whole number of seconds, got {signal_seconds!r}")
    return Grid(name, path, list(configs), overrides, axes, exclude, sbatch, resources, signal_seconds)


def check_sbatch_options(options: list[str], where: str) -> list[str]:
    """Refuse `--job-name`/`-J` and `--array`/`-a`: timelit sets both, and its queue check relies on them (with a job
    name of the user's, the sweep's running tasks would be invisible to it and submitted a second time)."""
    for option in options:
        name = option.split("=", 1)[0].split(" ", 1)[0]
        for long, (short, why) in _RESERVED_SBATCH.items():
            # sbatch takes unambiguous abbreviations of long options (`--job-na=x`) and `-Jx` for `-J x`.
            if (len(name) > len("--jo") and long.startswith(name)) or name.startswith(short):
                raise GridError(f"{where}: '{option}' sets {long}, which timelit sweep sets itself ({why})")
    return options
