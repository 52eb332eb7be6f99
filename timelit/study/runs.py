"""One run as `timelit report` reads it from its results.json: the model the report's tables (`study.report`),
statistics (`study.stats`) and plots (`study.plots`, `study.group_plots`) share, in a module of its own so that none
of them imports another to get it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timelit.training.evaluation.forgetting import ForgettingMatrix

UNKNOWN = "unknown"
SUMMARY_KEYS = ("A_KA", "A_ZS", "GM")


@dataclass
class RunResult:
    """What the report needs of one run's results.json."""

    name: str
    path: Path
    init: str = UNKNOWN
    deploy: str = UNKNOWN
    technique: str = UNKNOWN
    model: str = UNKNOWN
    budget_gflops: float | None = None
    num_tasks: int | None = None
    seed: int | None = None
    stream: str = UNKNOWN
    mixture: str = UNKNOWN
    complete: bool = False
    tasks: list[int] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)
    full_end: dict[str, float] = field(default_factory=dict)
    gflops_spent: float = math.nan
    zero_shot_step: int = 0
    forgetting: ForgettingMatrix | None = None
    environments: list[dict[str, Any]] = field(default_factory=list)  # results.json's, oldest first

    @property
    def protocol(self) -> str:
        return f"{self.init}/{self.deploy}"

    @property
    def has_protocol(self) -> bool:
        return UNKNOWN not in (self.init, self.deploy)

    @property
    def tasks_done(self) -> int:
        return self.tasks[-1] if self.tasks else 0

    def final(self, key: str) -> float:
        return self.curves[key][-1] if self.tasks else math.nan

    def mean(self, key: str) -> float:
        """Mean over the evaluations after each task; the zero-shot point (task 0) is not a task."""
        values = [v for t, v in zip(self.tasks, self.curves.get(key, [])) if t > 0]
        return sum(values) / len(values) if values else math.nan

    def zero_shot(self, key: str) -> float:
        return self.curves[key][0] if self.tasks and self.tasks[0] == 0 else math.nan

    @property
    def status(self) -> str:
        if self.complete:
            return "yes"
        return f"no ({self.tasks_done}/{self.num_tasks if self.num_tasks is not None else '?'} tasks)"
