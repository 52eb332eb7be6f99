"""The PNG plots of `timelit report`: curves over tasks, the init x deploy grid, the A_KA vs A_ZS plane, scaling.

    timelit report runs/ --out report

Figures are drawn on `matplotlib.figure.Figure` objects (the Agg canvas), never through pyplot, so no global
backend or figure state is touched and nothing needs a display. Incomplete runs are drawn dashed or hollow and
labelled "(incomplete)" or starred, so a half-finished sweep is not read as a finished one.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from timelit.study.runs import SUMMARY_KEYS, UNKNOWN, RunResult

INITS = ("zs", "ft", "ema", "all")
DEPLOYS = ("ft", "ema", "all")
TITLES = {
    "A_KA": "A_KA: knowledge accumulation (adaptation datasets)",
    "A_ZS": "A_ZS: zero-shot retention (held-out datasets)",
    "GM": "GM = sqrt(A_KA · A_ZS)",
}
TASK_AXIS = "tasks trained (0 = zero-shot model)"


def colours(count: int) -> list[Any]:
    """Distinct colours for `count` runs (qualitative maps while they last, then a sequential one)."""
    if count <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(count)]
    return [matplotlib.colormaps["viridis"](x) for x in np.linspace(0, 0.95, count)]


def _label(run: RunResult) -> str:
    return run.name if run.complete else f"{run.name} (incomplete)"


def _legend_below(fig: Figure, ax: Any) -> None:
    """The legend under the axes, in as many columns as the longest label leaves room for."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    fontsize = 8 if len(labels) > 6 else 9
    chars_per_row = fig.get_figwidth() * 72 / (0.62 * fontsize)  # a character is about 0.6 em wide
    columns = max(1, min(4, len(labels), int(chars_per_row // (max(len(label) for label in labels) + 8))))
    fig.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize=fontsize)


def plot_curves(runs: list[RunResult], path: Path) -> Path:
    """A_KA, A_ZS and GM after every task, one line per run; incomplete runs dashed."""
    fig = Figure(figsize=(15, 4.6 + 0.18 * math.ceil(len(runs) / 3)), layout="constrained")
    axes = fig.subplots(1, 3)
    for run, colour in zip(runs, colours(len(runs))):
        marker = "o" if len(run.tasks) <= 30 else None
        for ax, key in zip(axes, SUMMARY_KEYS):
            ax.plot(
                run.tasks, run.curves[key], "-" if run.complete else "--",
                color=colour, marker=marker, markersize=3.5, label=_label(run),
            )  # fmt: skip
    return finish_summary_curves(fig, axes, "Accuracy over the stream, evaluated after every task", path)


def finish_summary_curves(fig: Figure, axes: Any, title: str, path: Path) -> Path:
    """Titles, labels and legend of a row of A_KA / A_ZS / GM-per-task panels, then the file: the per-run curves and
    the per-group ones (`study.group_plots`) read alike."""
    for ax, key in zip(axes, SUMMARY_KEYS):
        ax.set_title(TITLES[key], fontsize=10)
        ax.set_xlabel(TASK_AXIS)
        ax.set_ylabel(f"{key} (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0])
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def plot_protocol_grid(runs: list[RunResult], path: Path) -> Path | None:
    """Final GM of each init x deploy pair as a heat map, one panel per merge technique; None without protocols.

    One-task runs (the multitask bound) are left out: with no task boundary the protocol never acts, and averaging
    them into the ft/ft cell would mix two experiments."""
    runs = [r for r in runs if r.has_protocol and r.tasks and not math.isnan(r.final("GM")) and r.num_tasks != 1]
    if len({r.protocol for r in runs}) < 2:
        return None
    inits = list(INITS) + sorted({r.init for r in runs} - set(INITS))
    deploys = list(DEPLOYS) + sorted({r.deploy for r in runs} - set(DEPLOYS))
    techniques = sorted({r.technique for r in runs})
    cells: dict[tuple[str, str, str], list[RunResult]] = defaultdict(list)
    for run in runs:
        cells[run.technique, run.init, run.deploy].append(run)
    # An unfinished run's last point is not comparable with a finished run's: use it only where nothing finished.
    cells = {key: [r for r in members if r.complete] or members for key, members in cells.items()}
    means = [np.mean([r.final("GM") for r in members]) for members in cells.values()]
    vmin, vmax = float(min(means)), float(max(means))
    vmax = vmax if vmax > vmin else vmin + 1.0
    columns = min(3, len(techniques))
    rows = math.ceil(len(techniques) / columns)
    fig = Figure(figsize=(4.2 * columns + 1.4, 3.7 * rows + 1.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")
    image, starred = None, False
    for ax, technique in zip(axes, techniques):
        grid = np.full((len(inits), len(deploys)), np.nan)
        for i, init in enumerate(inits):
            for j, deploy in enumerate(deploys):
                members = cells.get((technique, init, deploy), [])
                if not members:
                    ax.text(j, i, "—", ha="center", va="center", color="#888888")
                    continue
                grid[i, j] = np.mean([r.final("GM") for r in members])
                star = "" if all(r.complete for r in members) else "*"
                starred |= bool(star)
                count = f"\n(n={len(members)})" if len(members) > 1 else ""
                dark = (grid[i, j] - vmin) / (vmax - vmin) < 0.55
                ax.text(j, i, f"{grid[i, j]:.1f}{star}{count}", ha="center", va="center",
                        color="white" if dark else "black", fontsize=10)  # fmt: skip
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(deploys)), deploys)
        ax.set_yticks(range(len(inits)), inits)
        ax.set_xlabel("deploy (weights evaluated after a task)")
        ax.set_ylabel("init (weights a task starts from)")
        ax.set_title(f"technique: {technique}", fontsize=10)
    for ax in axes[len(techniques) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(techniques)].tolist(), label="final GM (%)", shrink=0.9)
    note = "; * = runs not finished, last point shown" if starred else ""
    fig.suptitle(f"Final GM (%) per TIME protocol (mean over runs when n > 1{note})", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def _iso_gm(ax: Any) -> None:
    """Dashed curves of constant GM = sqrt(A_KA * A_ZS), labelled, over the current axis limits."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    low, high = math.sqrt(max(x0, 0.1) * max(y0, 0.1)), math.sqrt(max(x1, 0.1) * max(y1, 0.1))
    xs = np.linspace(max(x0, 0.1), x1, 200)
    for level in MaxNLocator(nbins=6).tick_values(low, high):
        if not low < level < high:
            continue
        ys = level**2 / xs
        inside = (ys >= y0) & (ys <= y1)
        if inside.sum() < 2:
            continue
        ax.plot(xs[inside], ys[inside], ":", color="#999999", linewidth=0.9, zorder=0)
        k = np.flatnonzero(inside)[-1]
        ax.text(xs[k], ys[k], f" GM={level:g}", fontsize=7, color="#777777", ha="right", va="bottom")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


def plot_plane(runs: list[RunResult], path: Path) -> Path | None:
    """Each run's path through the (A_KA, A_ZS) plane, from the zero-shot point to the last task (arrow)."""
    runs = [r for r in runs if any(not math.isnan(a * z) for a, z in zip(r.curves["A_KA"], r.curves["A_ZS"]))]
    if not runs:
        return None
    fig = Figure(figsize=(10, 6.8), layout="constrained")
    ax = fig.subplots()
    starts: set[tuple[float, float]] = set()
    for run, colour in zip(runs, colours(len(runs))):
        ka, zs = np.array(run.curves["A_KA"]), np.array(run.curves["A_ZS"])
        ok = ~np.isnan(ka) & ~np.isnan(zs)
        ka, zs = ka[ok], zs[ok]
        marker = "o" if len(ka) <= 30 else None
        ax.plot(ka, zs, "-" if run.complete else "--", color=colour, alpha=0.45, linewidth=1.2, marker=marker,
                markersize=3)  # fmt: skip
        if len(ka) >= 2:
            ax.annotate("", xy=(ka[-1], zs[-1]), xytext=(ka[-2], zs[-2]),
                        arrowprops={"arrowstyle": "-|>", "color": colour, "linewidth": 1.5})  # fmt: skip
        ax.scatter(ka[-1], zs[-1], s=70, zorder=3, label=_label(run), edgecolors=colour, linewidths=1.8,
                   facecolors=colour if run.complete else "none")  # fmt: skip
        if not math.isnan(run.zero_shot("A_KA")):
            starts.add((round(run.zero_shot("A_KA"), 6), round(run.zero_shot("A_ZS"), 6)))
    if starts:
        xs, ys = zip(*sorted(starts))
        ax.scatter(xs, ys, marker="*", s=260, color="black", zorder=4, label="zero-shot model (task 0)")
    ax.margins(0.12)
    ax.autoscale_view()
    _iso_gm(ax)
    ax.set_xlabel("A_KA: mean over adaptation datasets (%)")
    ax.set_ylabel("A_ZS: mean over held-out datasets (%)")
    ax.grid(alpha=0.3)
    ax.set_title(
        "Knowledge accumulation vs zero-shot retention\n"
        "line: evaluations after each task; dot: after the last task (hollow = incomplete); dotted: constant GM",
        fontsize=10,
    )
    fig.legend(loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------------- scaling


def model_parameters(name: str) -> int | None:
    """Parameter count of an open_clip architecture, built on the meta device (no memory, no download)."""
    try:
        import open_clip
        import torch

        from timelit.training.clip import register_model_configs

        register_model_configs()
        root = logging.getLogger()
        level, root.level = root.level, max(root.level, logging.ERROR)  # "initialized randomly" is expected
        try:
            with torch.device("meta"):
                model = open_clip.create_model(name, pretrained=None, device="meta")
        finally:
            root.setLevel(level)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an unknown or custom architecture: the plot falls back to model names
        return None


SCALING_AXES: dict[str, tuple[str, Callable[[RunResult], Any]]] = {
    "model": ("model size", lambda r: r.model if r.model != UNKNOWN else None),
    "budget": ("compute budget (GFLOPs, log scale)", lambda r: r.budget_gflops),
    "horizon": ("tasks in the stream (log scale)", lambda r: r.num_tasks),
}


def _group_label(run: RunResult, varying: list[str]) -> str:
    """protocol · technique, plus the other axes and the data mixture where they vary among the plotted runs (a run may
    lack a budget): runs without replay must not be averaged into a line of runs with it."""
    values = {
        "model": run.model,
        "budget": "no budget" if run.budget_gflops is None else f"{run.budget_gflops:.3g} GFLOPs",
        "horizon": f"{run.num_tasks} tasks",
        "mixture": run.mixture,
    }
    return " · ".join([run.protocol, run.technique] + [values[axis] for axis in varying])


def plot_scaling(runs: list[RunResult], axis: str, path: Path) -> Path | None:
    """Final GM against model size, budget or horizon, one line per protocol; None when `axis` does not vary.

    One-task runs (the multitask bound) are left out, as from the protocol grid: they are no point of a stream's
    horizon (a multitask run beside 4-task streams drew a 1-to-4-task "ft/ft" line), nor a protocol's."""
    title, value_of = SCALING_AXES[axis]
    runs = [
        r for r in runs if value_of(r) is not None and r.tasks and not math.isnan(r.final("GM")) and r.num_tasks != 1
    ]
    if len({value_of(r) for r in runs}) < 2:
        return None
    others = [a for a in SCALING_AXES if a != axis and len({SCALING_AXES[a][1](r) for r in runs}) > 1]
    others += ["mixture"] if len({r.mixture for r in runs}) > 1 else []
    if axis == "model":
        sizes = {name: model_parameters(name) for name in {r.model for r in runs}}
        known = all(size is not None for size in sizes.values())
        order = sorted(sizes, key=lambda n: (sizes[n] or 0, n) if known else n)
        position = {name: float(sizes[name]) if known else float(i) for i, name in enumerate(order)}
    groups: dict[str, dict[float, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        x = position[run.model] if axis == "model" else float(value_of(run))
        groups[_group_label(run, others)][x].append(run)
    fig = Figure(figsize=(9.5, 5.8 + 0.2 * math.ceil(len(groups) / 2)), layout="constrained")
    ax = fig.subplots()
    for (label, points), colour in zip(sorted(groups.items()), colours(len(groups))):
        xs = sorted(points)
        ys = [np.mean([r.final("GM") for r in points[x]]) for x in xs]
        ax.plot(xs, ys, "-", color=colour, label=label)
        for x, y in zip(xs, ys):
            complete = all(r.complete for r in points[x])
            ax.scatter(x, y, s=45, edgecolors=colour, facecolors=colour if complete else "none", zorder=3)
    if axis != "model" or known:
        ax.set_xscale("log")
    if axis == "model":
        ax.set_xticks([position[n] for n in order], [f"{n}\n({sizes[n] / 1e6:.1f}M)" if known else n for n in order])
        ax.minorticks_off()
    elif len({value_of(r) for r in runs}) <= 8:
        ticks = sorted({float(value_of(r)) for r in runs})
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(title if axis != "model" else "model (parameters)" if known else "model")
    ax.set_ylabel("final GM (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"Final GM vs {title.split(' (')[0]}, per protocol (hollow = incomplete; mean over runs)", fontsize=10)
    _legend_below(fig, ax)
    fig.savefig(path, dpi=110)
    return path
