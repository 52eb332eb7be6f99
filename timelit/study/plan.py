"""Planning a sweep: a grid -> its runs (points), each a `timelit fit` command line and a run folder. Nothing is
written or submitted here; the launchers (timelit/study/slurm.py, local.py) run what this plans.

    expand(load_grid(find_grid("quickstart")), root="runs")      the points of configs/sweeps/quickstart.yaml

Every combination of one value per axis is a point (the last axis varies fastest), minus the grid's `exclude`
rules; a point runs in `<root>/<sweep>/<point>` with the base configs, then each axis value's fragments and
overrides in axis order, then the user's `--overrides`, then the run folder.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from timelit.study.grid import Grid, GridError, override
from timelit.study.manifest import Point
from timelit.utilities.resources import resolve_config


def _is_grid(path: Path) -> bool:
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and "axes" in content


def _resolve_config(name: str, grid: Path) -> str:
    """A config item as an absolute path: a file (as given, or beside the grid, never a grid itself), else a
    shipped config, so the shipped grids' `quickstart.yaml` and `budget/tasks_20.yaml` are configs/'s (configs/sweeps/
    holds a grid named quickstart.yaml too, which a fit cannot read)."""
    for candidate in (Path(name).expanduser(), grid.parent / name):
        if candidate.is_file() and candidate.resolve() != grid.resolve() and not _is_grid(candidate):
            return str(candidate.resolve())
    try:
        return str(resolve_config(name).resolve())
    except FileNotFoundError as error:
        raise GridError(f"{grid}: {error}") from None


def run_dir_overrides(sweep_dir: Path, point: str) -> list[str]:
    """Where a point's run lives: <sweep dir>/<point>, the same directory at every (re)start."""
    return [
        f"--trainer.logger.init_args.save_dir={sweep_dir}",
        f"--trainer.logger.init_args.name={point}",
        "--trainer.logger.init_args.version=",
        f"--trainer.default_root_dir={sweep_dir / point}",
    ]


def expand(grid: Grid, root: str | Path = "runs", overrides: list[str] | None = None) -> list[Point]:
    """Every point of the grid, in axis order (the last axis varies fastest), minus the excluded combinations.

    `overrides` come after everything the grid says, so a user's command line wins; the run directory comes last.
    """
    sweep_dir = Path(root).expanduser().resolve() / grid.name
    extra = [override(o, "--overrides") for o in overrides or []]
    base_configs = [_resolve_config(c, grid.path) for c in grid.configs]
    points: list[Point] = []
    for combination in itertools.product(*grid.axes.values()):
        chosen = dict(zip(grid.axes, (value.name for value in combination)))
        if any(all(chosen.get(axis) == value for axis, value in rule.items()) for rule in grid.exclude):
            continue
        name = ",".join(f"{axis}={value}" for axis, value in chosen.items())
        argv = ["fit"] + [arg for c in base_configs for arg in ("--config", c)] + grid.overrides
        configs, point_overrides = list(base_configs), list(grid.overrides)
        for value in combination:
            for kind, text in value.items:
                if kind == "config":
                    resolved = _resolve_config(text, grid.path)
                    configs.append(resolved)
                    argv += ["--config", resolved]
                else:
                    point_overrides.append(text)
                    argv.append(text)
        point_overrides += extra
        argv += extra + run_dir_overrides(sweep_dir, name)
        points.append(Point(len(points), name, chosen, configs, point_overrides, str(sweep_dir / name), argv))
    if not points:
        raise GridError(f"{grid.path}: every combination is excluded; nothing to run")
    return points
