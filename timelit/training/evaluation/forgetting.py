"""The forgetting matrix of a stream: every adaptation dataset's figure after every task, and what it says.

    python -m timelit.training.evaluation.forgetting runs/quickstart/version_0/results.json

Read by `TaskResults` (the `forgetting` section of results.json, `forgetting/*` in TensorBoard) and by
`timelit report` (columns and heat maps), so that both compute the same numbers from the same inputs: the evaluation
points of results.json and, per task, the adaptation datasets whose concepts it trains (`run.data.task_datasets`).
No Lightning here.

Definitions (T = tasks done at the last point; figures in %):

- R[i][j]: summary figure of adaptation dataset j after i tasks (row 0 = the zero-shot model), as in the accuracy
  matrix of GEM (Lopez-Paz & Ranzato 2017, arXiv 1706.08840, §5).
- t_j, the dataset's *own task*: the last task (1-based) whose concepts include dataset j. In a dataset-incremental
  stream that is the one task that brings it; in a random stream (a dataset's concepts spread over several tasks) it is
  the task after which the model has seen all of it, so that later losses are forgetting, not learning still to come.
- Backward transfer, GEM's BWT: mean over datasets with t_j < T of R[T][j] - R[t_j][j]. Negative = forgetting.
- Average forgetting (Chaudhry et al. 2018, "Riemannian Walk", arXiv 1801.10112): mean over datasets with t_j < T
  of max_{t_j <= l < T} R[l][j] - R[T][j]: the drop from the best figure the dataset had once learnt. The paper takes
  the max over every earlier task; from the own task on, a dataset spread over several tasks is not "forgetting" the
  figure of a time it was still being learnt, and for a dataset-incremental stream the two agree whenever the
  figure before the own task is lower (a dataset is not known before it is taught).
- First-half drop (timelit's acceptance criterion, issue 15): mean over datasets with t_j <= T/2 of
  R[t_j][j] - R[T][j]: what the datasets learned in the first half of the stream lose by its end.

Datasets never trained in the stream (an adaptation dataset evaluated but absent from every task, or not yet reached
by an unfinished run) stay in the matrix but count in none of the three numbers: they have no own task. A dataset
whose own task is T was just learnt and has nothing to forget yet. Missing figures (NaN: a point not recorded, a
null in results.json) drop the dataset from the numbers that need them; a number with no dataset to average is NaN.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

NUMBERS = ("bwt", "avg_forgetting", "first_half_drop")


def own_tasks(task_datasets: Sequence[Iterable[str]]) -> dict[str, int]:
    """Each dataset's own task: the last task (1-based) that trains concepts of it."""
    owner: dict[str, int] = {}
    for task, datasets in enumerate(task_datasets, start=1):
        for name in datasets:
            owner[name] = task
    return owner


def _figure(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class ForgettingMatrix:
    """R[i][j] with its labels: `tasks[i]` tasks done (row), adaptation dataset `datasets[j]` (column).

    `own_task[name]` is the dataset's own task, or None when the stream never trains it.
    """

    tasks: list[int]
    datasets: list[str]
    values: list[list[float]]
    own_task: dict[str, int | None]

    def figure(self, tasks_done: int, dataset: str) -> float:
        """R[tasks_done][dataset]; NaN where that point or figure was not recorded."""
        if tasks_done not in self.tasks:
            return math.nan
        return self.values[self.tasks.index(tasks_done)][self.datasets.index(dataset)]

    @property
    def last(self) -> int:
        """T: tasks done at the last recorded point."""
        return self.tasks[-1] if self.tasks else 0

    def counted(self, number: str) -> list[str]:
        """The datasets that `number` ("bwt", "avg_forgetting" or "first_half_drop") averages over."""
        last = self.last
        chosen = []
        for name in self.datasets:
            own = self.own_task[name]
            if own is None:
                continue
            if (own <= last / 2) if number == "first_half_drop" else (own < last):
                chosen.append(name)
        return chosen

    def _terms(self, number: str) -> list[float]:
        last, terms = self.last, []
        for name in self.counted(number):
            own, final = self.own_task[name], self.figure(self.last, name)
            if number == "avg_forgetting":
                seen = [self.figure(step, name) for step in range(own, last)]  # type: ignore[arg-type]
                seen = [v for v in seen if not math.isnan(v)]
                term = max(seen) - final if seen else math.nan
            elif number == "bwt":
                term = final - self.figure(own, name)  # type: ignore[arg-type]
            else:
                term = self.figure(own, name) - final  # type: ignore[arg-type]
            if not math.isnan(term):
                terms.append(term)
        return terms

    @property
    def bwt(self) -> float:
        """Backward transfer (GEM): mean of R[T][j] - R[t_j][j] over datasets with t_j < T; negative = forgetting."""
        return _mean(self._terms("bwt"))

    @property
    def avg_forgetting(self) -> float:
        """Average forgetting (RWalk): mean of max_{t_j <= l < T} R[l][j] - R[T][j] over datasets with t_j < T."""
        return _mean(self._terms("avg_forgetting"))

    @property
    def first_half_drop(self) -> float:
        """Mean of R[t_j][j] - R[T][j] over datasets with t_j <= T/2; positive = lost."""
        return _mean(self._terms("first_half_drop"))

    def until(self, tasks_done: int) -> ForgettingMatrix:
        """The matrix as it stood after `tasks_done` tasks (the rows up to it), for per-task histories."""
        keep = [i for i, t in enumerate(self.tasks) if t <= tasks_done]
        return ForgettingMatrix([self.tasks[i] for i in keep], self.datasets, [self.values[i] for i in keep],
                                self.own_task)  # fmt: skip

    def summary(self) -> dict[str, float]:
        return {number: getattr(self, number) for number in NUMBERS}

    def to_dict(self) -> dict[str, Any]:
        """The `forgetting` section of results.json; NaN stays NaN (the writer turns it into null)."""
        return {
            "rows": self.tasks,
            "columns": self.datasets,
            "own_task": [self.own_task[name] for name in self.datasets],
            "matrix": self.values,
            **self.summary(),
            "counted": {number: self.counted(number) for number in NUMBERS},
            "history": [{"tasks_done": t, **self.until(t).summary()} for t in self.tasks if t > 0],
        }

    def markdown(self) -> str:
        """The matrix as a Markdown table (TensorBoard's text tab renders it): rows = tasks done."""
        head = ["tasks done", *(f"{name} (t={self.own_task[name] or '–'})" for name in self.datasets)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for tasks_done, row in zip(self.tasks, self.values):
            cells = [str(tasks_done), *("—" if math.isnan(v) else f"{v:.1f}" for v in row)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def forgetting_matrix(points: Sequence[dict[str, Any]], task_datasets: Sequence[Iterable[str]]) -> ForgettingMatrix:
    """R from results.json's `points` (each with `tasks_done` and `datasets: {name: {role, figure}}`).

    Columns are the adaptation datasets (role `adapt`) in order of first appearance in the points, then any dataset
    of `task_datasets` that was never evaluated (an all-NaN column says so); rows are the recorded points by tasks
    done. `task_datasets[t - 1]` lists the datasets task t trains.
    """
    owner = own_tasks(task_datasets)
    ordered = sorted((p for p in points if "tasks_done" in p), key=lambda p: p["tasks_done"])
    columns: dict[str, None] = {}
    for point in ordered:
        for name, entry in (point.get("datasets") or {}).items():
            if isinstance(entry, dict) and entry.get("role") == "adapt":
                columns.setdefault(name, None)
    for name in owner:
        columns.setdefault(name, None)
    datasets = list(columns)
    values = [
        [_figure(((point.get("datasets") or {}).get(name) or {}).get("figure")) for name in datasets]
        for point in ordered
    ]
    return ForgettingMatrix(
        tasks=[int(p["tasks_done"]) for p in ordered],
        datasets=datasets,
        values=values,
        own_task={name: owner.get(name) for name in datasets},
    )


def from_results(data: dict[str, Any]) -> ForgettingMatrix | None:
    """The matrix of a parsed results.json; None when its header lacks `run.data.task_datasets` (runs from before
    it was recorded: without each task's datasets there is no own task to measure forgetting from)."""
    task_datasets = ((data.get("run") or {}).get("data") or {}).get("task_datasets")
    if not isinstance(task_datasets, list):
        return None
    return forgetting_matrix(data.get("points") or [], task_datasets)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as handle:
            matrix = from_results(json.load(handle))
        if matrix is None:
            print(f"{path}: no run.data.task_datasets in the header; forgetting cannot be computed")
            continue
        print(f"{path}\n{matrix.markdown()}")
        print("  ".join(f"{k} {v:.2f}" for k, v in matrix.summary().items()))
