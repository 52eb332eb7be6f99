"""The per-group plots of `timelit report`: curves with a ±std band over seeds, and the forgetting matrix.

    timelit report runs/science --out report/science

A group is the runs that differ only in seed (`timelit.study.stats.group_runs`). Drawn on `Figure` objects, never
through pyplot, like `timelit.study.plots`, whose colours, legend and axis titles these share so that the two sets of
plots read alike.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from timelit.study.plots import TASK_AXIS, colours, finish_summary_curves
from timelit.study.runs import SUMMARY_KEYS
from timelit.study.stats import RunGroup


def plot_group_curves(groups: list[RunGroup], path: Path) -> Path | None:
    """A_KA, A_ZS and GM after every task, per group of seeds: mean line, mean ± std band (ddof=1, where at least
    two runs reached that task); None when no group has two runs (curves.png already shows every run)."""
    groups = [g for g in groups if g.counted]
    if not any(len(g.counted) > 1 for g in groups):
        return None
    fig = Figure(figsize=(15, 4.6 + 0.18 * math.ceil(len(groups) / 3)), layout="constrained")
    axes = fig.subplots(1, 3)
    for group, colour in zip(groups, colours(len(groups))):
        star = " *" if group.starred else ""
        for ax, key in zip(axes, SUMMARY_KEYS):
            at: dict[int, list[float]] = defaultdict(list)
            for run in group.counted:
                for task, value in zip(run.tasks, run.curves[key]):
                    if not math.isnan(value):
                        at[task].append(value)
            xs = sorted(at)
            mean = np.array([np.mean(at[x]) for x in xs])
            std = np.array([np.std(at[x], ddof=1) if len(at[x]) > 1 else np.nan for x in xs])
            ax.plot(xs, mean, "-", color=colour, marker="o" if len(xs) <= 30 else None, markersize=3,
                    label=f"{group.label} (n={len(group.counted)}{star})")  # fmt: skip
            ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)
    title = "Mean over seeds per group, band = ± sample std (* = unfinished runs' last points)"
    return finish_summary_curves(fig, axes, title, path)


def mean_forgetting(group: RunGroup) -> tuple[list[int], list[str], np.ndarray, dict[str, int | None]] | None:
    """The group's forgetting matrix averaged over its runs, cell by cell on the union of rows and columns
    (NaN where no run has the cell); None when no run of the group records the datasets of its tasks."""
    matrices = [r.forgetting for r in group.counted if r.forgetting is not None]
    if not matrices:
        return None
    rows = sorted({t for m in matrices for t in m.tasks})
    columns = list(dict.fromkeys(name for m in matrices for name in m.datasets))
    cells = np.full((len(matrices), len(rows), len(columns)), np.nan)
    for k, matrix in enumerate(matrices):
        for i, task in enumerate(rows):
            for j, name in enumerate(columns):
                if name in matrix.datasets:
                    cells[k, i, j] = matrix.figure(task, name)
    with np.errstate(all="ignore"):
        counts = np.sum(~np.isnan(cells), axis=0)
        mean = np.where(counts > 0, np.nansum(cells, axis=0) / np.maximum(counts, 1), np.nan)
    own = {name: next((m.own_task[name] for m in matrices if name in m.own_task), None) for name in columns}
    return rows, columns, mean, own


def plot_forgetting(groups: list[RunGroup], path: Path) -> Path | None:
    """Per group, the forgetting matrix (mean over seeds) as a heat map: rows = tasks done, columns = adaptation
    datasets, each dataset's own task outlined; None when no run records its tasks' datasets."""
    panels = [(g, m) for g in groups if (m := mean_forgetting(g)) is not None]
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    widest = max(len(m[1]) for _, m in panels)
    tallest = max(len(m[0]) for _, m in panels)
    # Cells shrink rather than the figure growing without bound (41 datasets x 20 tasks x 9 protocols).
    # A panel is never narrower than its two-line title.
    panel = (min(max(4.4, 1.6 + 0.55 * widest), 10.0), min(max(3.2, 1.6 + 0.32 * tallest), 8.0))
    fig = Figure(figsize=(columns * panel[0], rows * panel[1] + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")
    image = None
    for ax, (group, (tasks, datasets, mean, own)) in zip(axes, panels):
        image = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        if mean.size <= 400:
            for (i, j), value in np.ndenumerate(mean):
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 55 else "black")  # fmt: skip
        for j, name in enumerate(datasets):
            if own[name] in tasks:
                i = tasks.index(own[name])
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.set_xticks(range(len(datasets)), datasets, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), [str(t) for t in tasks], fontsize=7)
        ax.set_ylabel(TASK_AXIS, fontsize=8)
        numbers = {key: group.estimate(key).mean for key in ("bwt", "avg_forgetting", "first_half_drop")}
        text = {key: "—" if math.isnan(value) else f"{value:.1f}" for key, value in numbers.items()}
        star = "*" if group.starred else ""
        ax.set_title(
            f"{group.label} (n={len(group.counted)}{star})\nBWT {text['bwt']} · forgetting "
            f"{text['avg_forgetting']} · first-half drop {text['first_half_drop']}",
            fontsize=8,
        )
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(panels)].tolist(), label="figure (%)", shrink=0.8)
    fig.suptitle("Forgetting matrix: figure of each adaptation dataset after every task\n"
                 "mean over seeds; red: the dataset's own task (the last that trains it)", fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=110)
    return path
