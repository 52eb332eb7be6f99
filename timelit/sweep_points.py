"""A sweep's points as both launchers see them: one run of the grid, and whether it has finished.

Its own module so that `timelit.sweep` (planning, Slurm) and `timelit.launch_local` can both use it without importing
each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
