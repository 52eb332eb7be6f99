"""Judge the resolving-power criteria of docs/science.md section 1 from a `timelit report` folder of the science sweep.

    python docs/science/check_criteria.py docs/science            # prints the verdicts, writes criteria.json

The criteria were fixed before any protocol was compared; this script only reads what `timelit report` wrote
(runs.csv) so that the verdicts in docs/science.md are printed, not typed. Runs are grouped by the sweep's `protocol`
axis value in their point name (`protocol=ft_ft,seed=0`), which names the study's protocols unambiguously.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

REFERENCES = ("multitask", "ft_ft_no_replay")  # not stream protocols: criterion (c) leaves them out
QUICKSTART_SEED = 0  # the quickstart's one-seed check reads this seed's runs


def _point_axes(run: str) -> dict[str, str]:
    point = run.rsplit("/", 1)[-1]  # a report over several roots prefixes the sweep: `science/protocol=...`
    return dict(part.split("=", 1) for part in point.split(",") if "=" in part)


def read_runs(report_dir: Path) -> list[dict[str, Any]]:
    rows = []
    with (report_dir / "runs.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            axes = _point_axes(row["run"])
            if "protocol" not in axes or "variant" in axes:  # a scaling-sweep run is not a point of this study
                continue
            row["protocol"] = axes["protocol"]
            row["seed"] = int(axes["seed"]) if "seed" in axes else None
            rows.append(row)
    if not rows:
        raise SystemExit(f"{report_dir / 'runs.csv'}: no run of the science sweep (a point name with protocol=...)")
    return rows


def _number(value: str) -> float:
    return float(value) if value not in ("", "—", "nan") else math.nan


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1, as `timelit report`); std 0 for a single value."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def judge(rows: list[dict[str, Any]], seed: int | None = None) -> dict[str, Any]:
    """The four verdicts over every seed (`seed=None`) or over one seed's runs."""
    rows = [r for r in rows if seed is None or r["seed"] == seed]
    by_protocol: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_protocol.setdefault(row["protocol"], []).append(row)

    def stat(protocol: str, column: str) -> tuple[float, float]:
        return summary([_number(r[column]) for r in by_protocol.get(protocol, [])])

    zs_ka = summary([_number(r["zs_A_KA"]) for r in rows])[0]
    zs_zs = summary([_number(r["zs_A_ZS"]) for r in rows])[0]
    multitask_ka = stat("multitask", "final_A_KA")[0]
    ft_zs = stat("ft_ft", "final_A_ZS")
    drop = stat("ft_ft_no_replay", "first_half_drop")
    stream = {p: stat(p, "final_GM") for p in by_protocol if p not in REFERENCES}
    means = [m for m, _ in stream.values()]
    spread = max(means) - min(means) if means else math.nan
    largest_std = max((s for _, s in stream.values()), default=math.nan)
    verdicts = {
        "a": multitask_ka - zs_ka >= 40,
        "b1": ft_zs[0] - zs_zs <= -10,
        "b2": drop[0] >= 10,
        "c": spread >= 3 * largest_std if seed is None else None,  # a seed std needs several seeds
    }
    return {
        "seed": seed,
        "n_runs": len(rows),
        "zero_shot": {"A_KA": zs_ka, "A_ZS": zs_zs},
        "a_multitask_gain": multitask_ka - zs_ka,
        "b1_ft_ft_zs_change": ft_zs[0] - zs_zs,
        "b1_ft_ft_zs_std": ft_zs[1],
        "b2_first_half_drop": drop[0],
        "b2_first_half_drop_std": drop[1],
        "c_stream_gm": {p: {"mean": m, "std": s} for p, (m, s) in sorted(stream.items(), key=lambda kv: -kv[1][0])},
        "c_spread": spread,
        "c_largest_std": largest_std,
        "verdicts": verdicts,
    }


def _verdict(ok: bool | None) -> str:
    return "not judged on one seed" if ok is None else "PASS" if ok else "FAIL"


def render(result: dict[str, Any]) -> str:
    zs, v = result["zero_shot"], result["verdicts"]
    who = "all seeds" if result["seed"] is None else f"seed {result['seed']} only"
    lines = [
        f"{who}, {result['n_runs']} runs; zero-shot: A_KA {zs['A_KA']:.2f}, A_ZS {zs['A_ZS']:.2f}",
        f"(a) multitask A_KA gain {result['a_multitask_gain']:+.2f} pp (need >= +40): {_verdict(v['a'])}",
        f"(b1) ft/ft A_ZS change {result['b1_ft_ft_zs_change']:+.2f} ± {result['b1_ft_ft_zs_std']:.2f} pp "
        f"(need <= -10): {_verdict(v['b1'])}",
        f"(b2) ft/ft no replay first-half drop {result['b2_first_half_drop']:.2f} ± "
        f"{result['b2_first_half_drop_std']:.2f} pp (need >= 10): {_verdict(v['b2'])}",
        f"(c) {len(result['c_stream_gm'])} stream protocols; spread of final GM {result['c_spread']:.2f}, largest seed "
        f"std {result['c_largest_std']:.2f}, 3 x std = {3 * result['c_largest_std']:.2f}: {_verdict(v['c'])}",
    ]
    lines += [f"    {g['mean']:6.2f} ± {g['std']:.2f}  {p}" for p, g in result["c_stream_gm"].items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    report_dir = Path(argv[0] if argv else "docs/science")
    rows = read_runs(report_dir)
    results = {"all_seeds": judge(rows), "quickstart_seed": judge(rows, seed=QUICKSTART_SEED)}
    print(render(results["all_seeds"]))
    print(render(results["quickstart_seed"]))
    (report_dir / "criteria.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
