"""Tables for findings 3 and 4 of docs/science.md from a `timelit report` over the science and scaling sweeps.

    timelit report --runs runs/science runs/scaling --out docs/science/scaling
    python docs/science/scaling_table.py docs/science/scaling    # prints markdown, writes scaling_table.json

A science-sweep run (`protocol=ft_ft,seed=0`) is the centre point of the scaling study; a scaling run names its
variant (`variant=compute_x2,protocol=ft_ft,seed=0`). Only runs that finished count, and each cell says how many did:
a sweep stopped early leaves cells with fewer seeds, never silently mixed ones.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

PROTOCOLS = ("multitask", "ft_ft", "zs_all_average", "ema_ema_interpolation")
CENTRE = "centre"


def read(report_dir: Path) -> dict[tuple[str, str], list[dict[str, str]]]:
    cells: dict[tuple[str, str], list[dict[str, str]]] = {}
    with (report_dir / "runs.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            point = row["run"].rsplit("/", 1)[-1]  # several report roots prefix the sweep: `scaling/variant=...`
            axes = dict(part.split("=", 1) for part in point.split(",") if "=" in part)
            if axes.get("protocol") in PROTOCOLS and row.get("complete") == "True":
                cells.setdefault((axes.get("variant", CENTRE), axes["protocol"]), []).append(row)
    return cells


def _stat(rows: list[dict[str, str]], column: str) -> dict[str, Any]:
    values = [float(r[column]) for r in rows if r[column] not in ("", "—", "nan")]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def table(cells: dict[tuple[str, str], list[dict[str, str]]]) -> dict[str, dict[str, dict[str, Any]]]:
    variants = [CENTRE, *sorted({v for v, _ in cells} - {CENTRE})]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for variant in variants:
        row = {
            p: {k: _stat(cells.get((variant, p), []), f"final_{k}") for k in ("A_KA", "A_ZS", "GM")} for p in PROTOCOLS
        }
        out[variant] = row
    return out


def _cell(stat: dict[str, Any]) -> str:
    if not stat["n"]:
        return "not run"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f} (n={stat['n']})"


def render(result: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| variant | " + " | ".join(f"{p} GM" for p in PROTOCOLS) + " | multitask − ema/ema GM |",
        "|---|" + "---:|" * (len(PROTOCOLS) + 1),
    ]
    for variant, row in result.items():
        multitask, ema = row["multitask"]["GM"], row["ema_ema_interpolation"]["GM"]
        gap = f"{multitask['mean'] - ema['mean']:.2f}" if multitask["n"] and ema["n"] else "–"
        lines.append(f"| {variant} | " + " | ".join(_cell(row[p]["GM"]) for p in PROTOCOLS) + f" | {gap} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    report_dir = Path(argv[0] if argv else "docs/science/scaling")
    result = table(read(report_dir))
    print(render(result))
    (report_dir / "scaling_table.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
