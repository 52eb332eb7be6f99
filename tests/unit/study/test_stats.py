"""`timelit report`'s statistics on a worked example: seed groups, mean ± std (ddof=1), paired differences with
Student-t 95 % intervals, the reference group, and the forgetting columns and plots.

python -m pytest tests/unit/study/test_stats.py -q

The worked example (final GM, by seed):

    ema/ema interpolation   s0 50  s1 52  s2 57         mean 53    std sqrt(26/2) = 3.6056
    zs/all average          s0 46  s1 49  s2 51  s3 60  mean 51.5  std sqrt(109/3) = 6.0277
    zs/all - ema/ema over the shared seeds 0, 1, 2: -4, -3, -6
        mean -13/3 = -4.3333, sd sqrt(14/3 / 2) = 1.5275, se = sd / sqrt(3) = 0.8819,
        t_{0.975, 2} = 4.3027, 95 % CI = -4.3333 ± 3.7946 = [-8.1280, -0.5387]
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from timelit.commands.report import report_command
from timelit.study.report import load_runs
from timelit.study.stats import estimate, group_runs, paired_difference, reference_group, t_quantile_975
from timelit.utilities.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BEST = {"init": "ema", "deploy": "ema", "technique": "interpolation", "hparams": {}}
OFFLINE = {"init": "zs", "deploy": "all", "technique": "average", "hparams": {}}
FT = {"init": "ft", "deploy": "ft", "technique": "interpolation", "hparams": {}}


def run(protocol: dict, seed: int, gm: float, *, a_ka: float = 40.0, forgetting: bool = False) -> dict:
    """A finished 2-task results.json whose final GM is `gm`; with `forgetting`, two adaptation datasets A (task 1)
    and B (task 2) whose figures make BWT = -(gm - 40) and the first-half drop gm - 40."""
    points = []
    for t in range(3):
        figures = {"A": [10, 80, 80 - (gm - 40)][t], "B": [10, 20, 90][t]}
        points.append({
            "tasks_done": t,
            "A_KA": a_ka if t == 2 else 10.0,
            "A_ZS": 70.0,
            "GM": gm if t == 2 else 20.0 + t,
            "datasets": {k: {"role": "adapt", "task": "classification", "figure": v} for k, v in figures.items()},
        })  # fmt: skip
    data_header: dict = {"stream": "incremental", "num_tasks": 2, "seed": seed}
    if forgetting:
        data_header["task_datasets"] = [["A"], ["B"]]
    header = {"model": {"model_name": "timelit-tiny-ViT"}, "data": data_header, "protocol": protocol}
    return {"run": header, "complete": True, "points": points, "full": {}}


def write(root: Path, name: str, data: dict) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(data))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for seed, gm in enumerate([50, 52, 57]):
        write(root, f"best_s{seed}", run(BEST, seed, gm, a_ka=30.0 + seed, forgetting=True))
    for seed, gm in enumerate([46, 49, 51, 60]):
        write(root, f"offline_s{seed}", run(OFFLINE, seed, gm, forgetting=True))
    write(root, "ft_s0", run(FT, 0, 45))
    return root


def test_t_quantiles_are_the_table_values_and_approach_the_normal_one():
    assert t_quantile_975(1) == 12.7062 and t_quantile_975(2) == 4.3027 and t_quantile_975(30) == 2.0423
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=1e-4)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=1e-4)
    with pytest.raises(ValueError, match="df=0"):
        t_quantile_975(0)


def test_mean_std_and_interval_of_the_worked_example():
    e = estimate([50, 52, 57])
    assert (e.mean, e.n) == (53, 3) and e.std == pytest.approx(math.sqrt(13))
    assert e.cell() == "53.00 ± 3.61"
    assert estimate([46, 49, 51, 60]).std == pytest.approx(math.sqrt(109 / 3))
    one = estimate([40.0])
    assert one.cell() == "40.00 ± –" and math.isnan(one.ci_low) and one.ci_cell() == "+40.00 –"


def test_runs_differing_only_in_seed_form_a_group_and_pair_over_shared_seeds(sweep):
    runs, _ = load_runs([str(sweep)])
    groups = group_runs(sorted(runs, key=lambda r: r.name))
    assert [(g.label, len(g.runs)) for g in groups] == [
        ("ema/ema · interpolation", 3),
        ("ft/ft · interpolation", 1),
        ("zs/all · average", 4),
    ]
    best, ft, offline = groups
    assert reference_group(groups, None) is best  # Best-in-TIME by default
    assert offline.estimate("GM").mean == pytest.approx(51.5)
    diff = paired_difference(offline, best, "GM")
    assert diff.n == 3  # seed 3 has no partner
    assert diff.mean == pytest.approx(-13 / 3)
    assert diff.std == pytest.approx(math.sqrt(7 / 3))
    half = 4.3027 * math.sqrt(7 / 3) / math.sqrt(3)
    assert (diff.ci_low, diff.ci_high) == (pytest.approx(-13 / 3 - half), pytest.approx(-13 / 3 + half))
    assert diff.ci_low == pytest.approx(-8.1280, abs=1e-4) and diff.ci_high == pytest.approx(-0.5387, abs=1e-4)
    # A_KA: offline 40 every seed, Best-in-TIME 30, 31, 32 -> differences 10, 9, 8.
    ka = paired_difference(offline, best, "A_KA")
    assert (ka.mean, ka.std) == (pytest.approx(9.0), pytest.approx(1.0))
    lone = paired_difference(ft, best, "GM")
    assert lone.n == 1 and lone.mean == -5 and math.isnan(lone.ci_low)


def test_the_report_writes_group_and_paired_tables(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    written = report_command([str(sweep)], out=str(out))
    markdown = (out / "report.md").read_text()
    printed = capsys.readouterr().out
    for text in (markdown, printed):
        assert "| ema/ema · interpolation | 3 | 0,1,2 | 31.00 ± 1.00 | 70.00 ± 0.00 | 53.00 ± 3.61 |" in text
        assert "| ft/ft · interpolation | 1 | 0 | 40.00 ± – | 70.00 ± – | 45.00 ± – |" in text
        assert "Paired differences from ema/ema · interpolation" in text
        assert "| zs/all · average | 3 | -4.33 [-8.13, -0.54] | +9.00 [+6.52, +11.48] | +0.00 [+0.00, +0.00] |" in text
        assert "| ft/ft · interpolation | 1 | -5.00 – |" in text
    with (out / "groups.csv").open() as handle:
        rows = {row["group"]: row for row in csv.DictReader(handle)}
    assert rows["ema/ema · interpolation"]["reference"] == "True"
    assert float(rows["zs/all · average"]["GM_std"]) == pytest.approx(math.sqrt(109 / 3))
    assert float(rows["zs/all · average"]["diff_GM_ci_low"]) == pytest.approx(-8.1280, abs=1e-4)
    assert rows["ft/ft · interpolation"]["GM_std"] == ""  # n = 1: no std
    # Forgetting: Best-in-TIME's A loses gm - 40 = 10, 12, 17 -> first-half drop mean 13; ft/ft has no task_datasets.
    first_half = rows["ema/ema · interpolation"]["first_half_drop_mean"]
    assert float(first_half) == pytest.approx(13.0)
    assert rows["ft/ft · interpolation"]["bwt_mean"] == ""
    with (out / "runs.csv").open() as handle:
        runs = {row["run"]: row for row in csv.DictReader(handle)}
    assert float(runs["best_s2"]["bwt"]) == pytest.approx(-17.0) and float(runs["best_s2"]["avg_forgetting"]) == 17.0
    pngs = {p.name for p in written if p.suffix == ".png"}
    assert {"group_curves.png", "forgetting.png"} <= pngs
    for name in ("group_curves.png", "forgetting.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        assert f"![{name[:-4]}]({name})" in markdown


def test_the_reference_is_chosen_by_label_and_a_wrong_one_lists_the_groups(sweep, tmp_path, capsys):
    report_command([str(sweep)], out=str(tmp_path / "a"), plots=False, reference="zs/all")
    assert "Paired differences from zs/all · average" in capsys.readouterr().out
    report_command([str(sweep)], out=str(tmp_path / "b"), plots=False, reference="ft/ft")  # the start of one label
    assert "Paired differences from ft/ft · interpolation" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"'ema/all' matches no group; the groups are: 'ema/ema · interpolation'"):
        report_command([str(sweep)], out=str(tmp_path / "c"), plots=False, reference="ema/all")
    assert not (tmp_path / "c").exists()  # checked before anything is written
