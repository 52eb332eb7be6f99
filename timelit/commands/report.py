"""`timelit report`: tables and plots over the results.json of many runs (a sweep).

    timelit report runs/scaling --out report
    timelit report runs/a runs/b --reference 'zs/all'

What the tables and plots hold, and which number is "final", is in timelit/study/report.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from timelit.study.report import write_report


def report_command(
    runs: list[str], out: str = "report", plots: bool = True, reference: str | None = None
) -> list[Path]:
    """Tables and plots of A_KA, A_ZS and GM over many runs (a sweep): runs.csv, report.md and PNG plots.

    Prints the table. Runs that have not finished are kept and marked; protocol, technique and budget read
    "unknown" for runs whose results.json lacks them.

    Args:
        runs: run directories, results.json files, or folders searched recursively for results.json (a sweep root).
        out: folder to write runs.csv, report.md and the plots into (created if missing).
        plots: also draw the PNG plots (curves over tasks, init x deploy grid, A_KA vs A_ZS plane, scaling,
            GM per task with a band per group, forgetting heat maps).
        reference: the group that paired differences are taken against, by its label in the group table (or the
            start of exactly one label, e.g. "zs/all"); default: Best-in-TIME (ema/ema, interpolation) if present,
            else the first group.
    """
    if Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give the folder to write the report into")
    return write_report(runs, out, plots, reference)


def report_argv(args: list[str]) -> list[str]:
    """`RUN_DIR... --out DIR` (or `--runs RUN_DIR...`) -> `--runs=[...] --out DIR`, for a jsonargparse CLI called
    with as_positional=False.

    jsonargparse reads a list argument from one token, so the run directories a user lists after `timelit report`
    (or after `--runs`, as a shell glob gives them) are gathered into one JSON list here; `--runs=[a,b]` stays.
    """
    runs: list[str] = []
    position = 0
    while position < len(args) and not args[position].startswith("-"):
        runs.append(args[position])
        position += 1
    rest = []
    while position < len(args):
        arg = args[position]
        position += 1
        if arg == "--runs" and position < len(args) and not args[position].startswith("["):
            while position < len(args) and not args[position].startswith("-"):
                runs.append(args[position])
                position += 1
        else:
            rest.append(arg)
    return ([f"--runs={json.dumps(runs)}"] if runs else []) + rest
