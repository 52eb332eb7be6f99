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
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from timelit.study.stats import estimate

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


def _by_seed(rows: list[dict[str, str]]) -> dict[str, float]:
    return {r["run"].rsplit("seed=", 1)[-1]: float(r["final_GM"]) for r in rows}


# The two gaps of findings 3 and 4, each as (the other protocol, the sign that makes it "other − ema/ema" or back).
GAPS = {"multitask_minus_ema": ("multitask", 1), "ema_minus_zs_all": ("zs_all_average", -1)}


def _gap(cells: dict[tuple[str, str], list[dict[str, str]]], variant: str, name: str) -> dict[str, float]:
    """One gap by seed, over the seeds where both of its runs finished."""
    ema = _by_seed(cells.get((variant, "ema_ema_interpolation"), []))
    other, sign = GAPS[name]
    theirs = _by_seed(cells.get((variant, other), []))
    return {s: sign * (theirs[s] - ema[s]) for s in set(ema) & set(theirs)}


def paired_gaps(cells: dict[tuple[str, str], list[dict[str, str]]]) -> dict[str, dict[str, Any]]:
    """Per variant: multitask GM − Best-in-TIME GM over the seeds both finished, with its 95 % t interval (how far
    temporal merging is from the multitask reference, finding 3), and the same for Best-in-TIME − offline merging."""
    out: dict[str, dict[str, Any]] = {}
    for variant in sorted({v for v, _ in cells}):  # sorted: the same JSON from every run
        for name in GAPS:
            gap = _gap(cells, variant, name)
            e = estimate([gap[s] for s in sorted(gap)])
            out.setdefault(variant, {})[name] = {"mean": e.mean, "ci_low": e.ci_low, "ci_high": e.ci_high, "n": e.n}
    return out


# Budgets of the compute axis as multiples of the centre's, for finding 3's trend (docs/science.md section 6).
BUDGETS = {"compute_x0.5": 0.5, CENTRE: 1.0, "compute_x2": 2.0}
# The gaps' directions under finding 3: more compute narrows multitask − ema/ema and widens ema/ema − zs/all.
EXPECTED_SIGN = {"multitask_minus_ema": -1, "ema_minus_zs_all": +1}


def compute_trend(cells: dict[tuple[str, str], list[dict[str, str]]]) -> dict[str, Any]:
    """Per gap: each seed's least-squares slope against log2(budget) over the three budgets (seeds with all three
    only), their mean with a 95 % t interval, and the verdict of docs/science.md section 6."""
    x = {variant: math.log2(b) for variant, b in BUDGETS.items()}
    out: dict[str, Any] = {}
    for name, expected in EXPECTED_SIGN.items():
        gaps = {variant: _gap(cells, variant, name) for variant in BUDGETS}
        seeds = sorted(set.intersection(*(set(g) for g in gaps.values())))
        slopes = []
        for seed in seeds:
            xs, ys = [x[v] for v in BUDGETS], [gaps[v][seed] for v in BUDGETS]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slopes.append(sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs))
        e = estimate(slopes)
        if e.n < 2 or math.isnan(e.ci_low):
            verdict = "not measured" if not slopes else "not resolved"
        elif e.ci_high < 0 if expected < 0 else e.ci_low > 0:
            verdict = "reproduced"
        elif e.ci_low > 0 if expected < 0 else e.ci_high < 0:
            verdict = "contradicted"
        else:
            verdict = "not resolved"
        out[name] = {"slopes": slopes, "mean": e.mean, "ci_low": e.ci_low, "ci_high": e.ci_high, "n": e.n,
                     "verdict": verdict}  # fmt: skip
    return out


def render_trend(trend: dict[str, Any]) -> str:
    lines = [
        "| gap | slope per doubling of compute (mean over seeds) | 95 % CI | n | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for name, t in trend.items():
        if not t["n"]:
            lines.append(f"| {name} | – | – | 0 | {t['verdict']} |")
            continue
        interval = "–" if t["n"] < 2 else f"[{t['ci_low']:+.2f}, {t['ci_high']:+.2f}]"
        lines.append(f"| {name} | {t['mean']:+.2f} | {interval} | {t['n']} | {t['verdict']} |")
    return "\n".join(lines)


def plot_compute(cells: dict[tuple[str, str], list[dict[str, str]]], path: Path) -> Path:
    """Final GM against the compute budget (0.5x, 1x, 2x of the centre) for the four protocols of the scaling study,
    mean ± std over the seeds: the compute axis of finding 3 alone (the report's scaling_budget.png mixes in the
    other variants, whose budgets differ for other reasons)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for protocol in PROTOCOLS:
        xs, means, stds = [], [], []
        for variant, budget in BUDGETS.items():
            stat = _stat(cells.get((variant, protocol), []), "final_GM")
            if stat["n"]:
                xs.append(budget)
                means.append(stat["mean"])
                stds.append(stat["std"])
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=protocol)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(BUDGETS.values()), [f"{b:g}x" for b in BUDGETS.values()])
    ax.minorticks_off()
    ax.set_xlabel("compute budget (x the quickstart's 3,144 GFLOPs)")
    ax.set_ylabel("final GM (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _gap_cell(gap: dict[str, Any] | None) -> str:
    if not gap or not gap["n"]:
        return "–"
    interval = "" if gap["n"] < 2 else f" [{gap['ci_low']:+.2f}, {gap['ci_high']:+.2f}]"
    return f"{gap['mean']:+.2f}{interval} (n={gap['n']})"


def _cell(stat: dict[str, Any]) -> str:
    if not stat["n"]:
        return "not run"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f} (n={stat['n']})"


def render(result: dict[str, dict[str, dict[str, Any]]], gaps: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| variant | " + " | ".join(f"{p} GM" for p in PROTOCOLS) + " | multitask − ema/ema | ema/ema − zs/all |",
        "|---|" + "---:|" * (len(PROTOCOLS) + 2),
    ]
    for variant, row in result.items():
        gap = gaps.get(variant, {})
        lines.append(
            f"| {variant} | "
            + " | ".join(_cell(row[p]["GM"]) for p in PROTOCOLS)
            + f" | {_gap_cell(gap.get('multitask_minus_ema'))} | {_gap_cell(gap.get('ema_minus_zs_all'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    report_dir = Path(argv[0] if argv else "docs/science/scaling")
    cells = read(report_dir)
    result, gaps, trend = table(cells), paired_gaps(cells), compute_trend(cells)
    print(render(result, gaps))
    print("\nFinding 3 along compute (docs/science.md section 6):\n" + render_trend(trend))
    plot_compute(cells, report_dir / "compute_axis.png")
    record = {"gm": result, "paired": gaps, "compute_trend": trend}
    (report_dir / "scaling_table.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
