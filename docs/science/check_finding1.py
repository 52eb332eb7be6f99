"""Judge finding 1 of docs/science.md at six seeds by the rule fixed in section 6 before the runs existed.

    timelit report --runs runs/science runs/science_seeds --out docs/science/seeds
    python docs/science/check_finding1.py docs/science/seeds      # prints the verdicts, writes finding1.json

Reads only the report's runs.csv. Each comparison pairs Best-in-TIME's final GM with another stream protocol's on the
same training seed; intervals are Student-t on the mean paired difference, plain 95 % and Bonferroni-adjusted over the
five comparisons (two-sided 99 % each, family-wise 95 %).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from timelit.study.stats import t_quantile_975

BEST_IN_TIME = "ema_ema_interpolation"
OTHERS = ("ft_ft", "zs_all_average", "zs_ema", "all_all_ties", "ema_ema_ties")
SEEDS = tuple(range(6))
FAMILY_ALPHA = 0.05


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom: the CDF integrated with Simpson's rule
    and inverted by bisection (exact to 1e-6; no scipy needed). The report's `t_quantile_975` is tabulated for the
    95 % level only; the Bonferroni level (99.5 % one-sided) needs this one."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    def cdf(x: float, steps: int = 2000) -> float:
        h = x / steps
        inner = sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
        return 0.5 + h / 3 * (pdf(0.0) + inner + pdf(x))

    low, high = 0.0, 1000.0
    while high - low > 1e-7:
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


def final_gm(report_dir: Path) -> dict[tuple[str, int], float]:
    """Final GM of every complete run, by (protocol axis value, seed)."""
    values: dict[tuple[str, int], float] = {}
    with (report_dir / "runs.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            point = row["run"].rsplit("/", 1)[-1]  # a report over several roots prefixes the sweep
            axes = dict(part.split("=", 1) for part in point.split(",") if "=" in part)
            if "protocol" in axes and "seed" in axes and "variant" not in axes and row.get("complete") == "True":
                values[(axes["protocol"], int(axes["seed"]))] = float(row["final_GM"])
    return values


def verdict(low: float, high: float, adjusted_low: float, adjusted_high: float) -> str:
    if adjusted_low > 0:
        return "ahead"
    if adjusted_high < 0:
        return "behind"
    if low > 0:
        return "ahead (unadjusted)"
    if high < 0:
        return "behind (unadjusted)"
    return "tied at n = 6"


def compare(values: dict[tuple[str, int], float]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for other in OTHERS:
        seeds = [s for s in SEEDS if (BEST_IN_TIME, s) in values and (other, s) in values]
        differences = [values[(BEST_IN_TIME, s)] - values[(other, s)] for s in seeds]
        row: dict[str, Any] = {"seeds": seeds, "differences": differences}
        if len(seeds) < len(SEEDS):
            row["verdict"] = "incomplete"
        else:
            n = len(differences)
            mean, error = statistics.fmean(differences), statistics.stdev(differences) / math.sqrt(n)
            half = t_quantile_975(n - 1) * error  # the report's own 95 % factor
            adjusted = t_quantile(1 - FAMILY_ALPHA / (2 * len(OTHERS)), n - 1) * error
            row.update(
                mean=mean,
                ci95=[mean - half, mean + half],
                ci_bonferroni=[mean - adjusted, mean + adjusted],
                verdict=verdict(mean - half, mean + half, mean - adjusted, mean + adjusted),
            )
        rows[other] = row
    return rows


def finding(values: dict[tuple[str, int], float], rows: dict[str, Any]) -> str:
    if any(row["verdict"] == "incomplete" for row in rows.values()):
        return "incomplete"
    means = {p: statistics.fmean(values[(p, s)] for s in SEEDS) for p in (BEST_IN_TIME, *OTHERS)}
    if any(row["verdict"].startswith("behind") for row in rows.values()):
        return "not reproduced"
    return "reproduced" if max(means, key=means.__getitem__) == BEST_IN_TIME else "tied"


def main(report_dir: Path) -> dict[str, Any]:
    values = final_gm(report_dir)
    rows = compare(values)
    blocks = {
        protocol: {
            label: statistics.fmean(values[(protocol, s)] for s in block) if all((protocol, s) in values for s in block)
            else None
            for label, block in (("seeds 0-2", SEEDS[:3]), ("seeds 3-5", SEEDS[3:]))
        }
        for protocol in (BEST_IN_TIME, *OTHERS)
    }  # fmt: skip
    result = {"comparisons": rows, "block_means": blocks, "finding_1": finding(values, rows)}
    print("| X | Δ GM (Best-in-TIME − X) | 95 % CI | Bonferroni CI | verdict |")
    print("|---|---:|---:|---:|---|")
    for other, row in rows.items():
        if row["verdict"] == "incomplete":
            print(f"| {other} | – | – | – | incomplete (seeds {row['seeds']}) |")
            continue
        low, high = row["ci95"]
        adjusted_low, adjusted_high = row["ci_bonferroni"]
        print(
            f"| {other} | {row['mean']:+.2f} | [{low:+.2f}, {high:+.2f}] | [{adjusted_low:+.2f}, {adjusted_high:+.2f}] "
            f"| {row['verdict']} |"
        )
    print("\nmean final GM by seed block:")
    for protocol, block in blocks.items():
        cells = ", ".join(f"{label} {'–' if v is None else f'{v:.2f}'}" for label, v in block.items())
        print(f"  {protocol}: {cells}")
    print(f"\nfinding 1: {result['finding_1']}")
    (report_dir / "finding1.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/science/seeds"))
