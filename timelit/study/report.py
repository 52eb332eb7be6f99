"""`timelit report`: one table and a few plots over the results.json of many runs (a sweep).

    timelit report runs/ --out report

Every argument is a run directory, a results.json, or a folder searched recursively for results.json (a sweep root).
One row per run goes to `runs.csv` and to the Markdown table of `report.md`, which is printed as well; the plots
(`timelit.study.plots`) are written beside them and embedded in `report.md`.

Which number is "final". The reference pipeline reports the evaluation after the last task, plus the zero-shot point
(FIF_REFERENCE.md §6); its README says "averaged across tasks" but its code reports the last value. This table gives
both: `final_*` is the last point of the stream (the fixed-subset evaluation after the last task trained so far),
`mean_*` the mean over the points after each task (the zero-shot point excluded), `zs_*` the zero-shot point (task 0),
and `full_end_*` the full-split evaluation after the stream when the run made one.

Runs that differ only in seed are grouped (`timelit.study.stats`): `groups.csv` and the group table of `report.md`
give each group's n and mean ± std (sample std, ddof=1) of the final A_KA, A_ZS, GM and of the forgetting numbers,
and the paired differences of every group from a reference group over the seeds both ran, with Student-t 95 %
intervals. `--reference` names the reference by its group label; by default it is Best-in-TIME (ema/ema,
interpolation) when the runs have it, else the first group.

Forgetting (`timelit.training.evaluation.forgetting`): backward transfer, average forgetting and the first-half drop of
each run, computed from its points and the datasets each task trains (`run.data.task_datasets`); "—" for runs written
before that header field existed.

Environments. Every results.json written since 2026-12-08 lists the code, torch, device, torch threads, precision and
world size that computed its points (`environments`, timelit.utilities.environment). The report warns, on stderr and
under report.md's tables, when the runs it compares were computed under different ones, or a run was resumed under
another: on a CPU the thread count alone moves a final GM about as much as a seed, so such differences are not only the
protocols'.

Protocol fields come from the run header that callbacks write into results.json (`run.protocol` from TimeMerge,
`run.budget` from ComputeBudget); a run without them reads "unknown". An incomplete run (killed, still running) keeps
its row and is marked, so a half-finished sweep can be read.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from timelit.study.runs import SUMMARY_KEYS, UNKNOWN, RunResult
from timelit.study.stats import (
    RunGroup,
    group_runs,
    group_table,
    paired_table,
    reference_group,
    statistics_rows,
)
from timelit.training.evaluation.forgetting import NUMBERS, from_results
from timelit.utilities.environment import differences
from timelit.utilities.errors import UserError

RESULTS_FILE = "results.json"
# Keys of `run.budget` read as the run's total budget in GFLOPs, in this order; a per-task budget times the number of
# tasks is the fallback (the ComputeBudget callback accepts either, ../shared issue 4).
TOTAL_BUDGET_KEYS = ("total_gflops", "gflops_total", "budget_gflops", "total")
PER_TASK_BUDGET_KEYS = ("gflops_per_task", "per_task_gflops")


def _number(value: Any) -> float:
    """A JSON number, or NaN for null / missing (results.json writes NaN as null)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _budget_gflops(budget: Any, num_tasks: int | None) -> float | None:
    if isinstance(budget, int | float) and not isinstance(budget, bool):
        return float(budget)
    if not isinstance(budget, dict):
        return None
    for key in TOTAL_BUDGET_KEYS:
        if isinstance(budget.get(key), int | float):
            return float(budget[key])
    for key in PER_TASK_BUDGET_KEYS:
        if isinstance(budget.get(key), int | float) and num_tasks:
            return float(budget[key]) * num_tasks
    return None


def _mixture_label(mixture: Any) -> str:
    """`pool 0.33 · replay 0.33` from the data module's mixture shares (the current task takes the rest)."""
    if not isinstance(mixture, dict):
        return UNKNOWN
    return f"pool {mixture.get('pretraining', '?'):g} · replay {mixture.get('replay', '?'):g}"


def _technique_label(protocol: dict[str, Any]) -> str:
    technique = protocol.get("technique")
    if not technique:
        return UNKNOWN
    hparams = protocol.get("hparams") or {}
    if isinstance(hparams, dict) and hparams:
        return f"{technique}({', '.join(f'{k}={v}' for k, v in sorted(hparams.items()))})"
    return str(technique)


def parse_results(data: dict[str, Any], name: str, path: Path) -> RunResult:
    """A RunResult from the content of one results.json (see timelit/training/callbacks/results.py for the layout)."""
    header = data.get("run") or {}
    protocol = header.get("protocol") or {}
    model = header.get("model") or {}
    data_header = header.get("data") or {}
    num_tasks = data_header.get("num_tasks")
    num_tasks = int(num_tasks) if isinstance(num_tasks, int) else None
    points = sorted((p for p in data.get("points") or [] if "tasks_done" in p), key=lambda p: p["tasks_done"])
    full_end = (data.get("full") or {}).get("end") or {}
    return RunResult(
        name=name,
        path=path,
        init=str(protocol.get("init") or UNKNOWN),
        deploy=str(protocol.get("deploy") or UNKNOWN),
        technique=_technique_label(protocol),
        model=str(model.get("model_name") or UNKNOWN),
        budget_gflops=_budget_gflops(header.get("budget"), num_tasks),
        num_tasks=num_tasks,
        seed=data_header.get("seed") if isinstance(data_header.get("seed"), int) else None,
        stream=str(data_header.get("stream") or UNKNOWN),
        mixture=_mixture_label(data_header.get("mixture")),
        complete=bool(data.get("complete", False)),
        tasks=[int(p["tasks_done"]) for p in points],
        curves={key: [_number(p.get(key)) for p in points] for key in SUMMARY_KEYS},
        full_end={key: _number(full_end.get(key)) for key in SUMMARY_KEYS},
        gflops_spent=_number(points[-1].get("gflops")) if points else math.nan,  # from ComputeBudget.task_record
        zero_shot_step=int(points[0].get("global_step") or 0) if points and points[0]["tasks_done"] == 0 else 0,
        forgetting=from_results(data),
        environments=[e for e in data.get("environments") or [] if isinstance(e, dict)],
    )


def find_results(paths: list[str]) -> list[Path]:
    """Every results.json named by `paths` (files, run directories, or roots searched recursively), sorted."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            found.add(path.resolve())
        elif (path / RESULTS_FILE).is_file():
            found.add((path / RESULTS_FILE).resolve())
        elif path.is_dir():
            hits = sorted(path.rglob(RESULTS_FILE))
            if not hits:
                raise FileNotFoundError(f"no {RESULTS_FILE} under {path}")
            found.update(hit.resolve() for hit in hits)
        else:
            raise FileNotFoundError(f"{path} does not exist (expected a run directory or a sweep root)")
    return sorted(found)


def run_names(files: list[Path]) -> list[str]:
    """Each run's directory relative to the deepest folder they share (a single run: its directory's name), without
    a last folder every run has (the logger's name, e.g. `<point>/quickstart`)."""
    dirs = [f.parent for f in files]
    if len(dirs) == 1:
        return [dirs[0].name]
    common = Path(os.path.commonpath([str(d) for d in dirs]))
    parts = [d.relative_to(common).parts or (d.name,) for d in dirs]
    if all(len(p) > 1 and p[-1] == parts[0][-1] for p in parts):
        parts = [p[:-1] for p in parts]
    return ["/".join(p) for p in parts]


def load_runs(paths: list[str]) -> tuple[list[RunResult], list[str]]:
    """The runs found under `paths`, and one message per results.json that could not be read."""
    files = find_results(paths)
    runs, skipped = [], []
    for file, name in zip(files, run_names(files)):
        try:
            data = json.loads(file.read_text())
            if not isinstance(data, dict):
                raise ValueError("the top level is not an object")
            runs.append(parse_results(data, name, file))
        except (OSError, ValueError, TypeError, KeyError) as error:
            skipped.append(f"{file}: {error}")
    return runs, skipped


def check_runs(runs: list[RunResult]) -> list[str]:
    """Warnings about figures that are not what their column says, or that are compared across software or
    machines that can change them."""
    warnings = [
        f"{run.name}: the zero-shot point was recorded at training step {run.zero_shot_step}, not 0 (the run was "
        f"resumed and evaluated again before training); its zs_* figures are not the zero-shot model's"
        for run in runs
        if run.zero_shot_step > 0
    ]
    return warnings + check_environments(runs)


def check_environments(runs: list[RunResult]) -> list[str]:
    """Runs computed under different code, torch, device, thread count, precision or world size
    (timelit.utilities.environment.NUMERIC_FIELDS): their differences are not only the protocols' and seeds'."""
    warnings = []
    for run in runs:
        steps = {f"from task {e.get('from_tasks_done')}": e for e in run.environments}
        for field, values in differences(steps).items():
            warnings.append(f"{run.name}: resumed under another {field}: {_values_text(values)}")
    recorded = {run.name: run.environments[0] for run in runs if run.environments}
    for field, values in differences(recorded).items():
        warnings.append(
            f"the runs were computed under different {field}: {_values_text(values)}; on a CPU the thread count "
            "alone moves a final GM about as much as a seed does, so their differences are not only the protocols'"
            if field == "torch_threads"
            else f"the runs were computed under different {field}: {_values_text(values)}"
        )
    unrecorded = [run.name for run in runs if not run.environments]
    if recorded and unrecorded:
        warnings.append(
            f"{len(unrecorded)} run(s) record no environment (written before timelit recorded it): "
            f"{_names_text(unrecorded)}"
        )
    return warnings


def _names_text(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _values_text(values: dict[Any, list[str]]) -> str:
    return "; ".join(f"{value} ({_names_text(names)})" for value, names in values.items())


# ---------------------------------------------------------------------------------------------------- table

COLUMNS = [
    "run", "init", "deploy", "technique", "model", "budget_gflops", "gflops_spent", "num_tasks", "seed", "tasks_done",
    *(f"{kind}_{key}" for kind in ("final", "mean", "zs", "full_end") for key in SUMMARY_KEYS),
    *NUMBERS, "stream", "mixture", "complete",
]  # fmt: skip


def table_rows(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One dict per run, keyed by COLUMNS; numbers stay numbers (NaN where a figure is missing)."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "init": run.init, "deploy": run.deploy, "technique": run.technique,
                               "model": run.model, "tasks_done": run.tasks_done, "complete": run.complete,
                               "gflops_spent": run.gflops_spent, "stream": run.stream,
                               "mixture": run.mixture}  # fmt: skip
        for column in ("budget_gflops", "num_tasks", "seed"):
            row[column] = UNKNOWN if getattr(run, column) is None else getattr(run, column)
        for key in SUMMARY_KEYS:
            row[f"final_{key}"], row[f"mean_{key}"] = run.final(key), run.mean(key)
            row[f"zs_{key}"], row[f"full_end_{key}"] = run.zero_shot(key), run.full_end.get(key, math.nan)
        for number in NUMBERS:
            row[number] = getattr(run.forgetting, number) if run.forgetting is not None else math.nan
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str] | None = None) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def markdown_table(runs: list[RunResult]) -> str:
    """The headline columns: final, task-averaged and zero-shot A_KA / A_ZS / GM in %, one row per run."""
    head = ["run", "protocol", "technique", "model", "budget (GFLOPs)", "tasks"]
    head += [f"{kind} {key}" for kind in ("final", "mean", "ZS") for key in SUMMARY_KEYS]
    head += ["BWT", "avg forgetting", "first-half drop", "complete"]
    numeric = range(6, len(head) - 1)
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if i in numeric else "---" for i in range(len(head))) + "|",
    ]
    for run in runs:
        budget = f"{run.budget_gflops:.3g}" if run.budget_gflops is not None else UNKNOWN
        tasks = str(run.num_tasks) if run.num_tasks is not None else UNKNOWN
        cells = [run.name, run.protocol, run.technique, run.model, budget, tasks]
        cells += [_fmt(getter(key)) for getter in (run.final, run.mean, run.zero_shot) for key in SUMMARY_KEYS]
        cells += [_fmt(getattr(run.forgetting, n) if run.forgetting else math.nan) for n in NUMBERS]
        cells.append(run.status)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the report


def write_report(runs: list[str], out: str | Path, plots: bool = True, reference: str | None = None) -> list[Path]:
    """runs.csv, groups.csv, report.md and the plots of the runs found under `runs`, in `out`; prints the tables
    and returns the files written (`timelit report`, timelit/commands/report.py, says what each argument is)."""
    results, skipped = load_runs(list(runs))
    for message in skipped:
        print(f"timelit report: skipped {message}", file=sys.stderr)
    warnings = check_runs(results)
    for message in warnings:
        print(f"timelit report: warning: {message}", file=sys.stderr)
    if not results:
        raise UserError(f"none of the results.json files under {list(runs)} could be read")
    results.sort(key=lambda r: r.name)
    groups = group_runs(results)
    reference_of = reference_group(groups, reference)  # a wrong --reference fails before anything is written
    out_dir = Path(out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "runs.csv", out_dir / "report.md", out_dir / "groups.csv"]
    write_csv(table_rows(results), written[0])
    stats = statistics_rows(groups, reference_of)
    write_csv(stats, written[2], columns=list(stats[0]))
    table = markdown_table(results)
    statistics = _statistics_section(groups, reference_of)
    figures = _draw_figures(results, groups, out_dir) if plots else []
    written[1].write_text(_markdown_document(table, statistics, figures, skipped, warnings))
    print(table)
    print(f"\n{statistics}")
    print(f"\nwrote {', '.join(str(p) for p in written + figures)}")
    return written + figures


def _draw_figures(results: list[RunResult], groups: list[RunGroup], out_dir: Path) -> list[Path]:
    """Every plot the runs support, written into `out_dir`; returns the files written. matplotlib is imported here,
    only when plots are asked for."""
    from timelit.study.group_plots import plot_forgetting, plot_group_curves
    from timelit.study.plots import SCALING_AXES, plot_curves, plot_plane, plot_protocol_grid, plot_scaling

    drawn = [
        plot_curves(results, out_dir / "curves.png"),
        plot_protocol_grid(results, out_dir / "protocol_grid.png"),
        plot_plane(results, out_dir / "ka_zs_plane.png"),
        *(plot_scaling(results, axis, out_dir / f"scaling_{axis}.png") for axis in SCALING_AXES),
        plot_group_curves(groups, out_dir / "group_curves.png"),
        plot_forgetting(groups, out_dir / "forgetting.png"),
    ]
    return [path for path in drawn if path is not None]


def _statistics_section(groups: list[Any], reference: Any) -> str:
    """The group table and the paired differences from the reference, with how to read them."""
    parts = [
        "## Groups (runs that differ only in seed)",
        "",
        "mean ± sample std (ddof=1) over the group's runs, n runs (* = none finished: last points of unfinished "
        "runs); BWT: backward transfer (negative = forgetting); avg forgetting and first-half drop: positive = lost.",
        "",
        group_table(groups),
    ]
    if len(groups) > 1:
        parts += [
            "",
            f"## Paired differences from {reference.label}",
            "",
            "group − reference in final figures, per seed both ran: mean [Student-t 95 % CI], n shared seeds "
            "(– with one seed).",
            "",
            paired_table(groups, reference),
        ]
    return "\n".join(parts)


def _markdown_document(
    table: str, statistics: str, figures: list[Path], skipped: list[str], warnings: list[str]
) -> str:
    parts = [
        "# timelit report",
        "",
        "A_KA: mean over the adaptation datasets (knowledge accumulation); A_ZS: mean over the held-out datasets "
        "(zero-shot retention); GM = sqrt(A_KA * A_ZS); all in %. *final*: after the last task trained; *mean*: "
        "averaged over the evaluations after each task; *ZS*: the zero-shot model before the stream.",
        "",
        "",
        "## Runs",
        "",
        table,
        "",
        statistics,
    ]
    if warnings:
        parts += ["", "Warnings:", *[f"- {message}" for message in warnings]]
    if skipped:
        parts += ["", "Skipped (unreadable results.json):", *[f"- {message}" for message in skipped]]
    for figure in figures:
        parts += ["", f"![{figure.stem}]({figure.name})"]
    return "\n".join(parts) + "\n"
