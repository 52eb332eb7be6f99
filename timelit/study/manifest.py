"""A sweep folder as both launchers see it: its points (`manifest.jsonl`, one line per point; array task i runs
line i), whether a point has finished (its results.json says `"complete": true`), and what a launcher writes before
the first run starts.

The planner (timelit/study/plan.py) makes the points, the launchers (slurm.py, local.py) run them; this module is
what they share, so that none imports another.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timelit.study.grid import GridError
from timelit.utilities.atomic import write_text

MANIFEST_FILE = "manifest.jsonl"
RESULTS_FILE = "results.json"


@dataclass
class Point:
    """One run of the sweep: line `index` of the manifest, array task `index`."""

    index: int
    name: str
    axes: dict[str, str]
    configs: list[str]
    overrides: list[str]
    run_dir: str
    argv: list[str]

    def record(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "axes": self.axes,
            "configs": self.configs,
            "overrides": self.overrides,
            "run_dir": self.run_dir,
            "argv": self.argv,
        }


def is_complete(run_dir: str | Path) -> bool:
    """True when the run's results.json says the whole stream was trained and evaluated."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def manifest_text(points: list[Point]) -> str:
    return "".join(json.dumps(point.record(), sort_keys=True) + "\n" for point in points)


def check_manifest(sweep_dir: Path, text: str, grid_path: Path, rewrite: bool = False) -> None:
    """Refuse a sweep folder whose manifest.jsonl differs from `text` (what the grid expands to now) unless
    `rewrite`: array tasks read it again whenever they are requeued, so it is never replaced silently."""
    manifest = sweep_dir / MANIFEST_FILE
    if manifest.is_file() and manifest.read_text() != text and not rewrite:
        raise GridError(
            f"{manifest} differs from what {grid_path} expands to now (grid, root or overrides changed). Array tasks "
            "read it again whenever they are requeued, so it is not replaced: use another sweep name or root, or "
            "--rewrite_manifest true once none of its tasks is queued or running."
        )


def write_sweep_files(sweep_dir: Path, text: str, grid_path: Path) -> None:
    """What every launcher leaves in the sweep folder before the first run starts: manifest, grid.yaml, logs/."""
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    write_text(sweep_dir / MANIFEST_FILE, text)
    shutil.copyfile(grid_path, sweep_dir / "grid.yaml")
