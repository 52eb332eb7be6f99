"""docs/science/check_criteria.py judges the criteria of docs/science.md section 1 from a report's runs.csv."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

SCIENCE = Path(__file__).resolve().parents[2] / "docs" / "science"
COLUMNS = ["run", "zs_A_KA", "zs_A_ZS", "final_A_KA", "final_A_ZS", "final_GM", "first_half_drop"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCIENCE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def criteria():
    return _load("check_criteria")


def _write(folder: Path, rows: list[list[object]]) -> Path:
    with (folder / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return folder


def _study(ft_zs: tuple[float, float], spread_protocol_gm: tuple[float, float]) -> list[list[object]]:
    """Two seeds; zero-shot A_KA 10, A_ZS 80; ema/ema GM 50 and 54 (std 2.83)."""
    rows: list[list[object]] = []
    for seed in (0, 1):
        rows.append([f"protocol=multitask,seed={seed}", 10, 80, 60, 75, 67, "—"])
        rows.append([f"protocol=ft_ft,seed={seed}", 10, 80, 70, ft_zs[seed], 60, 1.0])
        rows.append([f"protocol=ft_ft_no_replay,seed={seed}", 10, 80, 30, 20, 25, 12.0 + seed])
        rows.append([f"protocol=ema_ema_interpolation,seed={seed}", 10, 80, 60, 78, (50, 54)[seed], -1.0])
        rows.append([f"protocol=zs_all_average,seed={seed}", 10, 80, 40, 78, spread_protocol_gm[seed], 0.0])
    return rows


def test_worked_example_passes_every_criterion(criteria, tmp_path):
    # ft/ft A_ZS 69 and 70: mean 69.5, change -10.5; stream GM means 60 (ft/ft), 52 (ema/ema), 30 (zs/all):
    # spread 30 >= 3 x 2.83 = 8.49; no-replay drop 12.5.
    result = criteria.judge(criteria.read_runs(_write(tmp_path, _study((69, 70), (30, 30)))))
    assert result["a_multitask_gain"] == pytest.approx(50)
    assert result["b1_ft_ft_zs_change"] == pytest.approx(-10.5)
    assert result["b2_first_half_drop"] == pytest.approx(12.5)
    assert result["c_spread"] == pytest.approx(30)
    assert result["c_largest_std"] == pytest.approx(2 * 2**0.5)
    assert result["verdicts"] == {"a": True, "b1": True, "b2": True, "c": True}
    assert "multitask" not in result["c_stream_gm"] and "ft_ft_no_replay" not in result["c_stream_gm"]


def test_failing_criteria_are_reported_as_failures(criteria, tmp_path):
    # ft/ft keeps its zero-shot skill (-9.5) and the stream protocols sit within 3 seed stds (spread 8 < 8.49).
    rows = _study((70, 71), (56, 56))
    rows = [r if not r[0].startswith("protocol=ft_ft,") else [*r[:5], 55, r[6]] for r in rows]
    result = criteria.judge(criteria.read_runs(_write(tmp_path, rows)))
    assert result["verdicts"]["b1"] is False
    assert result["c_spread"] == pytest.approx(4)
    assert result["verdicts"]["c"] is False


def test_one_seed_is_judged_on_that_seed_only_and_leaves_c_open(criteria, tmp_path):
    result = criteria.judge(criteria.read_runs(_write(tmp_path, _study((69, 75), (30, 30)))), seed=0)
    assert result["n_runs"] == 5
    assert result["b1_ft_ft_zs_change"] == pytest.approx(-11)
    assert result["verdicts"]["c"] is None


def test_main_writes_criteria_json(criteria, tmp_path, capsys):
    folder = _write(tmp_path, _study((69, 70), (30, 30)))
    assert criteria.main([str(folder)]) == 0
    written = json.loads((folder / "criteria.json").read_text())
    assert written["all_seeds"]["verdicts"]["b1"] is True
    assert "(b1) ft/ft A_ZS change -10.50" in capsys.readouterr().out


def test_a_report_without_science_points_is_an_error_naming_the_file(criteria, tmp_path):
    _write(tmp_path, [["some_run", 1, 2, 3, 4, 5, 6]])
    with pytest.raises(SystemExit, match=r"runs\.csv: no run of the science sweep"):
        criteria.read_runs(tmp_path)


def test_a_report_over_both_sweeps_judges_the_science_runs_only(criteria, tmp_path):
    rows = [[f"science/{r[0]}", *r[1:]] for r in _study((69, 70), (30, 30))]
    rows.append(["scaling/variant=mini_model,protocol=ft_ft,seed=0", 10, 80, 70, 10, 30, 1.0])
    result = criteria.judge(criteria.read_runs(_write(tmp_path, rows)))
    assert result["n_runs"] == 10
    assert result["b1_ft_ft_zs_change"] == pytest.approx(-10.5)


def test_scaling_table_groups_by_variant_and_counts_finished_runs_only(tmp_path):
    scaling = _load("scaling_table")
    with (tmp_path / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "final_A_KA", "final_A_ZS", "final_GM", "complete"])
        writer.writerow(["science/protocol=multitask,seed=0", 90, 80, 84, True])
        writer.writerow(["science/protocol=multitask,seed=1", 92, 80, 86, True])
        writer.writerow(["science/protocol=ema_ema_interpolation,seed=0", 80, 80, 80, True])
        writer.writerow(["scaling/variant=compute_x2,protocol=multitask,seed=0", 95, 80, 87, True])
        writer.writerow(["scaling/variant=compute_x2,protocol=ft_ft,seed=0", 95, 70, 81, False])
    result = scaling.table(scaling.read(tmp_path))
    assert list(result) == ["centre", "compute_x2"]
    assert result["centre"]["multitask"]["GM"] == {"mean": 85, "std": pytest.approx(2**0.5), "n": 2}
    assert result["compute_x2"]["ft_ft"]["GM"]["n"] == 0  # unfinished: not counted
    gaps = scaling.paired_gaps(scaling.read(tmp_path))
    assert gaps["centre"]["multitask_minus_ema"]["n"] == 1  # seed 0 only: ema/ema ran seed 0 alone
    assert gaps["centre"]["multitask_minus_ema"]["mean"] == pytest.approx(4)
    assert "| centre | 85.00 ± 1.41 (n=2) | not run | not run | 80.00 ± 0.00 (n=1) | +4.00 (n=1) | – |" in (
        scaling.render(result, gaps)
    )


@pytest.fixture(scope="module")
def finding1():
    return _load("check_finding1")


def test_t_quantiles_match_the_tables(finding1):
    assert finding1.t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert finding1.t_quantile(0.975, 5) == pytest.approx(2.571, abs=1e-3)
    assert finding1.t_quantile(0.995, 5) == pytest.approx(4.032, abs=1e-3)


def _finding1_runs(folder: Path, gm: dict[str, list[float]], complete: bool = True) -> Path:
    with (folder / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "final_GM", "complete"])
        for protocol, values in gm.items():
            for seed, value in enumerate(values):
                sweep = "science" if seed < 3 else "science_seeds"
                writer.writerow([f"{sweep}/protocol={protocol},seed={seed}", value, complete])
        # a scaling run of the same protocol and seed is another experiment: never paired
        writer.writerow(["scaling/variant=compute_x2,protocol=ft_ft,seed=0", 0.0, True])
    return folder


def test_finding1_worked_example(finding1, tmp_path):
    best = [80.0, 82.0, 84.0, 80.0, 82.0, 84.0]
    gm = {
        "ema_ema_interpolation": best,
        "ft_ft": [b - d for b, d in zip(best, [5, 6, 5, 6, 5, 6])],  # mean 5.5, sd 0.55: ahead even adjusted
        "zs_all_average": [b - d for b, d in zip(best, [1, 3, 1, 3, 1, 4])],  # mean 2.17, se 0.48: 95 % only
        "zs_ema": [b - d for b, d in zip(best, [3, -3, 3, -3, 2, -2])],  # centred near 0: tied
        "all_all_ties": [b - 1 for b in best],  # constant 1: zero spread, ahead
        "ema_ema_ties": [b + d for b, d in zip(best, [1, -1, 1, -1, 1, 0])],  # tied, but 0.17 higher on average
    }
    result = finding1.main(_finding1_runs(tmp_path, gm))
    verdicts = {name: row["verdict"] for name, row in result["comparisons"].items()}
    assert verdicts == {
        "ft_ft": "ahead",
        "zs_all_average": "ahead (unadjusted)",
        "zs_ema": "tied at n = 6",
        "all_all_ties": "ahead",
        "ema_ema_ties": "tied at n = 6",
    }
    ft = result["comparisons"]["ft_ft"]
    assert ft["mean"] == pytest.approx(5.5)
    assert ft["ci95"][0] == pytest.approx(5.5 - 2.5706 * (0.3**0.5) / 6**0.5, abs=1e-3)
    assert result["finding_1"] == "tied"  # nothing beats Best-in-TIME beyond noise, but ema/ema TIES has the top mean
    assert json.loads((tmp_path / "finding1.json").read_text())["finding_1"] == result["finding_1"]


def test_finding1_is_not_reproduced_when_a_protocol_beats_best_in_time(finding1, tmp_path):
    best = [80.0] * 6
    gm = {name: [81.0] * 6 for name in finding1.OTHERS} | {"ema_ema_interpolation": best}
    gm["ft_ft"] = [82.0, 83.0, 82.0, 83.0, 82.0, 83.0]
    result = finding1.main(_finding1_runs(tmp_path, gm))
    assert result["comparisons"]["ft_ft"]["verdict"] == "behind"
    assert result["finding_1"] == "not reproduced"


def test_finding1_with_a_missing_seed_is_incomplete(finding1, tmp_path):
    gm = {name: [80.0] * 5 for name in (*finding1.OTHERS, "ema_ema_interpolation")}
    result = finding1.main(_finding1_runs(tmp_path, gm))
    assert {row["verdict"] for row in result["comparisons"].values()} == {"incomplete"}
    assert result["finding_1"] == "incomplete"


def test_finding1_is_reproduced_when_best_in_time_leads_and_nothing_beats_it(finding1, tmp_path):
    gm = {name: [79.0, 81.0, 80.0, 79.0, 81.0, 80.0] for name in finding1.OTHERS}
    gm["ema_ema_interpolation"] = [80.0, 80.5, 81.0, 80.0, 80.5, 81.0]  # mean 80.5 against 80.0: not resolved
    result = finding1.main(_finding1_runs(tmp_path, gm))
    assert {row["verdict"] for row in result["comparisons"].values()} == {"tied at n = 6"}
    assert result["finding_1"] == "reproduced"


def test_compute_trend_is_the_per_seed_slope_against_log2_budget(tmp_path):
    scaling = _load("scaling_table")
    rows = []
    variants = {
        "compute_x0.5": "scaling/variant=compute_x0.5,",
        "centre": "science/",
        "compute_x2": "scaling/variant=compute_x2,",
    }
    # multitask − ema/ema shrinks by 2 GM per doubling (+ seed noise); ema/ema − zs/all stays flat around 5
    for i, prefix in enumerate(variants.values()):
        for seed, noise in enumerate((0.0, 0.5, -0.5)):
            ema = 80.0 + noise
            rows += [
                [f"{prefix}protocol=ema_ema_interpolation,seed={seed}", ema, True],
                [f"{prefix}protocol=multitask,seed={seed}", ema + 4 - 2 * i + noise * (i - 1), True],
                [f"{prefix}protocol=zs_all_average,seed={seed}", ema - 5 + noise * (i - 1), True],
            ]
    with (tmp_path / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "final_GM", "complete"])
        writer.writerows(rows)
    trend = scaling.compute_trend(scaling.read(tmp_path))
    narrowing = trend["multitask_minus_ema"]
    assert narrowing["slopes"] == pytest.approx([-2.0, -1.5, -2.5]) and narrowing["verdict"] == "reproduced"
    assert trend["ema_minus_zs_all"]["slopes"] == pytest.approx([0.0, -0.5, 0.5])
    assert trend["ema_minus_zs_all"]["verdict"] == "not resolved"


def test_compute_trend_without_the_2x_point_is_not_measured(tmp_path):
    scaling = _load("scaling_table")
    with (tmp_path / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "final_GM", "complete"])
        writer.writerow(["science/protocol=multitask,seed=0", 85, True])
        writer.writerow(["science/protocol=ema_ema_interpolation,seed=0", 83, True])
    assert scaling.compute_trend(scaling.read(tmp_path))["multitask_minus_ema"]["verdict"] == "not measured"
