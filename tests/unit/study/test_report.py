"""`timelit report` on hand-written results.json files: the CSV and Markdown rows, and which plots are drawn.

python -m pytest tests/unit/study/test_report.py -q
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from jsonargparse import CLI

from timelit.commands.report import report_argv, report_command
from timelit.study.report import find_results, load_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def results(
    a_ka: list[float],
    a_zs: list[float],
    *,
    num_tasks: int,
    protocol: dict | None = None,
    budget: dict | None = None,
    model: str = "timelit-tiny-ViT",
    complete: bool | None = None,
) -> dict:
    """A results.json as TaskResults writes it: one point per evaluation, task 0 being the zero-shot model."""
    run: dict = {"model": {"model_name": model}, "data": {"stream": "random", "num_tasks": num_tasks, "seed": 0}}
    if protocol is not None:
        run["protocol"] = protocol
    if budget is not None:
        run["budget"] = budget
    points = [
        {
            "tasks_done": t,
            "global_step": 10 * t,
            "A_KA": ka,
            "A_ZS": zs,
            "GM": math.sqrt(ka * zs),
            "datasets": {},
            "gflops": 1000.0 * t,
        }
        for t, (ka, zs) in enumerate(zip(a_ka, a_zs))
    ]
    done = len(points) - 1 == num_tasks if complete is None else complete
    return {"run": run, "complete": done, "points": points, "full": {}}


def write(root: Path, name: str, data: dict) -> Path:
    path = root / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def protocol(init: str, deploy: str, technique: str = "interpolation", **hparams: float) -> dict:
    return {"init": init, "deploy": deploy, "technique": technique, "hparams": hparams, "ema_weight": 0.5}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    budget = {"total_gflops": 3.0e6}
    write(root, "ft_ft", results([10, 20, 30, 40], [80, 70, 60, 50], num_tasks=3, protocol=protocol("ft", "ft"),
                                 budget=budget))  # fmt: skip
    write(root, "ema_ema", results([10, 15, 20, 25], [80, 78, 76, 74], num_tasks=3, protocol=protocol("ema", "ema"),
                                   budget=budget))  # fmt: skip
    write(root, "all_all_ties", results([10, 12, 14, 16], [80, 80, 79, 79], num_tasks=3,
                                        protocol=protocol("all", "all", "ties", k=0.3), budget=budget))  # fmt: skip
    write(root, "killed/run", results([10, 30], [80, 60], num_tasks=3, protocol=protocol("ft", "ft"), budget=budget))
    write(root, "no_protocol", results([10, 11, 12, 13], [80, 79, 78, 77], num_tasks=3))
    return root


def rows_by_run(out: Path) -> dict[str, dict[str, str]]:
    with (out / "runs.csv").open() as handle:
        return {row["run"]: row for row in csv.DictReader(handle)}


def test_table_has_one_row_per_run_with_final_mean_and_zero_shot_figures(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    written = report_command([str(sweep)], out=str(out))
    rows = rows_by_run(out)
    assert set(rows) == {"ft_ft", "ema_ema", "all_all_ties", "killed/run", "no_protocol"}
    ft = rows["ft_ft"]
    assert (ft["init"], ft["deploy"], ft["technique"], ft["model"]) == ("ft", "ft", "interpolation", "timelit-tiny-ViT")
    assert float(ft["budget_gflops"]) == 3.0e6 and ft["num_tasks"] == "3" and ft["complete"] == "True"
    assert float(ft["gflops_spent"]) == 3000.0
    assert float(ft["final_A_KA"]) == 40 and float(ft["final_A_ZS"]) == 50
    assert float(ft["final_GM"]) == pytest.approx(math.sqrt(40 * 50))
    assert float(ft["mean_A_KA"]) == pytest.approx(30)  # tasks 1-3; the zero-shot point is not a task
    assert float(ft["mean_A_ZS"]) == pytest.approx(60)
    assert float(ft["zs_A_KA"]) == 10 and float(ft["zs_GM"]) == pytest.approx(math.sqrt(800))
    assert rows["all_all_ties"]["technique"] == "ties(k=0.3)"
    assert rows["no_protocol"]["init"] == rows["no_protocol"]["technique"] == rows["no_protocol"]["budget_gflops"]
    assert rows["no_protocol"]["init"] == "unknown"
    killed = rows["killed/run"]
    assert (killed["complete"], killed["tasks_done"], float(killed["final_A_KA"])) == ("False", "1", 30.0)

    markdown = (out / "report.md").read_text()
    printed = capsys.readouterr().out
    for text in (markdown, printed):
        assert "| killed/run | ft/ft | interpolation | timelit-tiny-ViT | 3e+06 | 3 |" in text
        assert "no (1/3 tasks)" in text
        assert "| ft_ft | ft/ft | interpolation | timelit-tiny-ViT | 3e+06 | 3 | 40.00 | 50.00 | 44.72 |" in text
    assert "![curves](curves.png)" in markdown
    assert out / "runs.csv" in written and out / "report.md" in written


def test_plots_are_written_as_png(sweep, tmp_path):
    out = tmp_path / "report"
    written = report_command([str(sweep)], out=str(out))
    pngs = {p.name for p in written if p.suffix == ".png"}
    # Three protocols -> the grid; one model, budget and horizon -> no scaling plot.
    assert pngs == {"curves.png", "protocol_grid.png", "ka_zs_plane.png"}
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_scaling_plots_appear_when_the_runs_vary_horizon_budget_and_model(tmp_path):
    root = tmp_path / "scaling"
    for tasks in (2, 4):
        for gflops in (1e6, 2e6):
            for model in ("timelit-micro-ViT", "timelit-tiny-ViT"):
                curve = [10 + 5 * t * gflops / 1e6 for t in range(tasks + 1)]
                data = results(curve, [80 - t for t in range(tasks + 1)], num_tasks=tasks, model=model,
                               protocol=protocol("ema", "ema"), budget={"gflops_per_task": gflops / tasks})  # fmt: skip
                write(root, f"T{tasks}_B{gflops:g}_{model}", data)
    written = report_command([str(root)], out=str(tmp_path / "out"))
    names = {p.name for p in written}
    assert {"scaling_model.png", "scaling_budget.png", "scaling_horizon.png"} <= names
    assert "protocol_grid.png" not in names  # a single protocol is no grid
    assert {float(row["budget_gflops"]) for row in rows_by_run(tmp_path / "out").values()} == {1e6, 2e6}


def test_run_dirs_files_and_sweep_roots_are_all_accepted(sweep):
    assert len(find_results([str(sweep)])) == 5
    assert find_results([str(sweep / "ft_ft"), str(sweep / "ema_ema" / "results.json"), str(sweep / "ft_ft")]) == [
        (sweep / "ema_ema" / "results.json").resolve(),
        (sweep / "ft_ft" / "results.json").resolve(),
    ]
    runs, _ = load_runs([str(sweep / "ft_ft")])
    assert [r.name for r in runs] == ["ft_ft"]


def test_run_names_drop_the_logger_folder_every_run_shares(tmp_path):
    for point in ("point_0", "point_1"):
        write(tmp_path / "sweep", f"{point}/quickstart", results([10, 20], [50, 40], num_tasks=1))
    runs, _ = load_runs([str(tmp_path / "sweep")])
    assert [r.name for r in runs] == ["point_0", "point_1"]


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        report_command([str(tmp_path / "nowhere")], out=str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no results\.json under .*empty"):
        report_command([str(tmp_path / "empty")], out=str(tmp_path / "out"))


def test_an_unreadable_results_file_is_skipped_and_reported(sweep, tmp_path, capsys):
    (sweep / "broken").mkdir()
    (sweep / "broken" / "results.json").write_text('{"run": ')
    report_command([str(sweep)], out=str(tmp_path / "out"), plots=False)
    assert len(rows_by_run(tmp_path / "out")) == 5
    assert "broken/results.json" in capsys.readouterr().err
    assert "broken/results.json" in (tmp_path / "out" / "report.md").read_text()


def test_null_figures_read_as_missing(tmp_path):
    data = results([10, 20], [50, 60], num_tasks=1)
    data["points"][1]["A_ZS"] = data["points"][1]["GM"] = None  # results.json writes NaN as null
    write(tmp_path / "runs", "a", data)
    report_command([str(tmp_path / "runs")], out=str(tmp_path / "out"))
    row = rows_by_run(tmp_path / "out")["a"]
    assert row["final_A_ZS"] == "" and float(row["final_A_KA"]) == 20


def test_a_zero_shot_point_recorded_after_training_is_flagged(tmp_path, capsys):
    data = results([10, 20], [50, 40], num_tasks=1)
    data["points"][0]["global_step"] = 40  # a resumed run evaluated again in its sanity check
    write(tmp_path / "runs", "resumed", data)
    report_command([str(tmp_path / "runs")], out=str(tmp_path / "out"), plots=False)
    assert "resumed: the zero-shot point was recorded at training step 40" in capsys.readouterr().err
    assert "training step 40" in (tmp_path / "out" / "report.md").read_text()


def test_runs_computed_under_different_environments_are_flagged(tmp_path, capsys):
    machine = {"from_tasks_done": 0, "commit": "abc", "torch": "2.14.1", "device": "cpu A", "torch_threads": 1,
               "precision": "32-true", "world_size": 1, "host": "node1"}  # fmt: skip
    runs = tmp_path / "runs"
    for seed, environments in enumerate(
        [
            [machine],
            [machine | {"host": "node2"}],  # another node of the same kind: not flagged
            [machine | {"torch_threads": 2}],
            [machine, machine | {"from_tasks_done": 1, "device": "cpu B"}],  # resumed on another machine
        ]
    ):
        data = results([10, 20], [50, 40], num_tasks=1, protocol=protocol("ema", "ema"))
        data["run"]["data"]["seed"] = seed
        write(runs, f"seed={seed}", data | {"environments": environments})
    write(runs, "old", results([10, 20], [50, 40], num_tasks=1, protocol=protocol("ema", "ema")))
    report_command([str(runs)], out=str(tmp_path / "out"), plots=False)
    err = capsys.readouterr().err
    assert "seed=3: resumed under another device: cpu A (from task 0); cpu B (from task 1)" in err
    assert "the runs were computed under different torch_threads: 1 (seed=0, seed=1, seed=3); 2 (seed=2)" in err
    assert "different host" not in err and "different device" not in err  # seed=3 started on cpu A like the rest
    assert "1 run(s) record no environment (written before timelit recorded it): old" in err
    assert "different torch_threads" in (tmp_path / "out" / "report.md").read_text()


def test_runs_of_one_environment_raise_no_warning(sweep, tmp_path, capsys):
    report_command([str(sweep)], out=str(tmp_path / "out"), plots=False)  # none records an environment
    assert "environment" not in capsys.readouterr().err


def test_command_line_with_run_dirs_as_positionals(sweep, tmp_path):
    """How cli.py dispatches it: jsonargparse with as_positional=False, the run dirs gathered by report_argv."""
    out = tmp_path / "cli"
    args = [str(sweep / "ft_ft"), str(sweep / "ema_ema"), "--out", str(out), "--plots", "false"]
    CLI({"report": report_command}, args=["report", *report_argv(args)], as_positional=False)
    assert set(rows_by_run(out)) == {"ft_ft", "ema_ema"}


def test_the_protocol_grid_leaves_out_one_task_runs(tmp_path):
    from timelit.study.plots import plot_protocol_grid

    write(tmp_path, "stream", results([10, 20, 30, 40], [80, 70, 60, 50], num_tasks=3, protocol=protocol("ft", "ft")))
    write(tmp_path, "multitask", results([10, 50], [80, 75], num_tasks=1, protocol=protocol("zs", "all")))
    runs, skipped = load_runs([str(tmp_path)])
    assert len(runs) == 2 and not skipped
    # One stream protocol is left once the multitask bound is out: no grid to draw.
    assert plot_protocol_grid(runs, tmp_path / "grid.png") is None


def test_the_scaling_plots_leave_out_one_task_runs(tmp_path):
    """A multitask bound beside streams of one horizon is no horizon study: no line from 1 task to 3."""
    from timelit.study.plots import plot_scaling

    write(tmp_path, "stream", results([10, 20, 30, 40], [80, 70, 60, 50], num_tasks=3, protocol=protocol("ft", "ft")))
    write(tmp_path, "multitask", results([10, 50], [80, 75], num_tasks=1, protocol=protocol("ft", "ft")))
    runs, _ = load_runs([str(tmp_path)])
    assert plot_scaling(runs, "horizon", tmp_path / "horizon.png") is None
    write(tmp_path, "longer", results([10, 20, 30, 40, 50, 60], [80] * 6, num_tasks=5, protocol=protocol("ft", "ft")))
    runs, _ = load_runs([str(tmp_path)])
    assert plot_scaling(runs, "horizon", tmp_path / "horizon.png") == tmp_path / "horizon.png"


def test_the_scaling_plots_keep_runs_without_replay_apart(tmp_path):
    """ft/ft with and without replay at one budget are two lines, not one averaged point (as in the science report)."""
    import dataclasses

    from timelit.study.plots import _group_label

    write(tmp_path, "stream", results([10, 20, 30, 40], [80, 70, 60, 50], num_tasks=3, protocol=protocol("ft", "ft")))
    (run,) = load_runs([str(tmp_path)])[0]
    replay = dataclasses.replace(run, mixture="pool 0.33 · replay 0.33")
    no_replay = dataclasses.replace(run, mixture="pool 0 · replay 0")
    assert _group_label(replay, ["mixture"]) != _group_label(no_replay, ["mixture"])
    assert _group_label(replay, []) == _group_label(no_replay, [])


def test_the_report_starts_without_torch():
    """docs/ARCHITECTURE.md: `timelit report` imports torch only inside the one plot function that needs it (its
    environment check reads results.json's records; timelit.utilities.environment imports torch only to make them)."""
    import subprocess
    import sys

    code = "import sys, timelit.study.report; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
