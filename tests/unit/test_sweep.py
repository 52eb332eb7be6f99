"""timelit sweep: grids expand to the intended runs, the array job is submitted once, finished points are skipped.

A fake `sbatch` and `squeue` on PATH record what would reach Slurm; tests/integration/test_slurm.py runs the same
command against a real one.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

import open_clip
import pytest
import yaml

from timelit.resources import configs_dir
from timelit.sweep import GridError, array_spec, expand, find_grid, load_grid, sweep_command

SHIPPED = ("quickstart", "model_size", "compute", "horizon")
FOMO_GFLOPS = 1.8e9


def write_grid(folder: Path, text: str) -> Path:
    path = folder / "grid.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def grid(tmp_path) -> Path:
    (tmp_path / "small.yaml").write_text("data:\n  init_args:\n    num_tasks: 3\n")
    return write_grid(
        tmp_path,
        """
name: study
configs: [quickstart.yaml]
overrides: ["--trainer.max_epochs 2"]
axes:
  size:
    tiny: [--model.init_args.model_name=timelit-tiny-ViT]
    micro: [small.yaml, {model.init_args.model_name: timelit-micro-ViT}]
  seed: {key: seed_everything, values: [0, 1]}
exclude: [{size: tiny, seed: 1}]
sbatch: [--cpus-per-task=2]
""",
    )


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`sbatch` that records its arguments and prints a job id; `squeue` that prints the file `queue`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls, queue = tmp_path / "sbatch_calls", tmp_path / "queue"
    queue.write_text("")
    scripts = {
        "sbatch": f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\necho 4242\n',
        "squeue": f"#!/bin/sh\ncat {queue}\n",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls, queue


def complete(run_dir: str, done: bool = True) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "results.json").write_text(json.dumps({"complete": done, "points": []}))


def test_a_grid_expands_to_every_combination_with_arguments_in_order(grid, tmp_path):
    points = expand(load_grid(grid), tmp_path / "runs", overrides=["--data.init_args.num_workers=0"])
    assert [p.name for p in points] == ["size=tiny,seed=0", "size=micro,seed=0", "size=micro,seed=1"]
    assert [p.index for p in points] == [0, 1, 2]
    micro = points[2]
    run_dir = tmp_path / "runs" / "study" / "size=micro,seed=1"
    assert micro.run_dir == str(run_dir) and micro.axes == {"size": "micro", "seed": "1"}
    assert micro.configs == [str(configs_dir() / "quickstart.yaml"), str(tmp_path / "small.yaml")]
    assert micro.argv == [
        "fit",
        "--config",
        str(configs_dir() / "quickstart.yaml"),
        "--trainer.max_epochs=2",
        "--config",
        str(tmp_path / "small.yaml"),
        "--model.init_args.model_name=timelit-micro-ViT",
        "--seed_everything=1",
        "--data.init_args.num_workers=0",
        f"--trainer.logger.init_args.save_dir={run_dir.parent}",
        "--trainer.logger.init_args.name=size=micro,seed=1",
        "--trainer.logger.init_args.version=",
        f"--trainer.default_root_dir={run_dir}",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\naxes: {a: {v: [--k=1]}}\nepochs: 3\n", "unknown key.* epochs; valid: name, description"),
        ("name: x\naxes: {}\n", "`axes` must map at least one axis"),
        ("name: x\naxes: {a: {'v/1': [--k=1]}}\n", "value name 'v/1' must use only letters"),
        ("name: x\naxes: {a: [--k=1]}\n", "a list axis holds config files only"),
        ("name: x\naxes: {a: {v: [-k=1]}}\nexclude: [{b: v}]\n", r"exclude rule \{'b': 'v'\} must map axis names"),
        ("name: x\naxes: {a: {v: [3]}}\n", "3 is neither a config file, an override"),
        ("name: x\naxes: {a: {v: [--k=1]}}\nexclude: [{a: v}]\n", "every combination is excluded"),
        ("name: x\naxes: {a: {v: [no_such_fragment.yaml]}}\n", "config 'no_such_fragment.yaml' is neither a file"),
    ],
)
def test_bad_grids_fail_naming_the_file_and_key(tmp_path, text, message):
    path = write_grid(tmp_path, text)
    with pytest.raises((GridError, FileNotFoundError), match=message) as error:
        expand(load_grid(path), tmp_path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("indices", "concurrency", "spec"),
    [([0, 1, 2], 2, "0-2%2"), ([5, 0, 1, 2, 7, 8], None, "0-2,5,7-8"), ([3], 1, "3%1")],
)
def test_array_spec_compresses_indices(indices, concurrency, spec):
    assert array_spec(indices, concurrency) == spec


def test_submits_one_array_job_and_then_only_unfinished_points(grid, tmp_path, fake_slurm, capsys):
    calls, queue = fake_slurm
    root = tmp_path / "runs"
    sweep_command(str(grid), root=str(root), concurrency=2, sbatch=["--time=01:00:00"])
    manifest = root / "study" / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["size=tiny,seed=0", "size=micro,seed=0", "size=micro,seed=1"]
    args = calls.read_text().splitlines()
    assert args[:8] == [
        "--parsable",
        "--array=0-2%2",
        args[2],
        f"--output={root / 'study' / 'logs' / '%a.log'}",
        "--open-mode=append",
        "--requeue",
        "--signal=USR1@300",
        "--cpus-per-task=2",
    ]
    assert args[2].startswith("--job-name=timelit-study-")
    assert args[8:] == ["--time=01:00:00", args[9], str(manifest)] and args[9].endswith("slurm/array.sbatch")
    assert (root / "study" / "grid.yaml").read_text() == grid.read_text()

    # point 0 finished, point 1 half-way (not complete), point 2 still running under the first submission
    complete(lines[0]["run_dir"])
    complete(lines[1]["run_dir"], done=False)
    queue.write_text("2 RUNNING\n")
    calls.unlink()
    sweep_command(str(grid), root=str(root), concurrency=2, sbatch=["--time=01:00:00"])
    assert "--array=1%2" in calls.read_text().splitlines()
    out = capsys.readouterr().out
    assert re.search(r"size=tiny,seed=0 +complete", out) and re.search(r"size=micro,seed=1 +queued or running", out)

    for line in lines:
        complete(line["run_dir"])
    queue.write_text("")
    calls.unlink()
    sweep_command(str(grid), root=str(root))
    assert not calls.exists() and "nothing to submit" in capsys.readouterr().out


def test_dry_run_writes_and_submits_nothing(grid, tmp_path, fake_slurm, capsys):
    calls, _ = fake_slurm
    sweep_command(str(grid), root=str(tmp_path / "runs"), only=["size=micro,*"], dry_run=True)
    out = capsys.readouterr().out
    assert not calls.exists() and not (tmp_path / "runs").exists()
    assert "--array=1-2 " in out and "size=tiny" not in out
    assert "[2] timelit fit --config" in out and "--seed_everything=1" in out


def test_a_changed_grid_does_not_replace_the_manifest_requeued_tasks_read(grid, tmp_path, fake_slurm):
    root = tmp_path / "runs"
    sweep_command(str(grid), root=str(root))
    manifest = (root / "study" / "manifest.jsonl").read_text()
    grid.write_text(grid.read_text().replace("values: [0, 1]", "values: [0, 1, 2]"))
    with pytest.raises(GridError, match=r"manifest.jsonl differs from what .* expands to now"):
        sweep_command(str(grid), root=str(root))
    assert (root / "study" / "manifest.jsonl").read_text() == manifest
    sweep_command(str(grid), root=str(root), rewrite_manifest=True)
    assert len((root / "study" / "manifest.jsonl").read_text().splitlines()) == 5


# ---------------------------------------------------------------------------------------------------- shipped grids


def _points(name: str):
    """The axes of a shipped grid expanded over no base config (the base configs are checked on their own below)."""
    spec = load_grid(find_grid(name))
    spec.configs = []
    return expand(spec, "/tmp/timelit-sweep-test")


def _effective(point, dotted: str):
    """The value a point's configs and overrides give `dotted`, the last one winning, as LightningCLI applies them."""
    value = None
    for i, arg in enumerate(point.argv):
        if arg == "--config":
            tree = yaml.safe_load(Path(point.argv[i + 1]).read_text()) or {}
            for part in dotted.split("."):
                tree = tree.get(part) if isinstance(tree, dict) else None
            value = tree if tree is not None else value
        elif arg.startswith(f"--{dotted}="):
            value = yaml.safe_load(arg.split("=", 1)[1])
    return value


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_grids_expand_to_one_uniquely_named_point_per_combination(name):
    spec = load_grid(find_grid(name))
    points = _points(name)
    assert len(points) == math.prod(len(values) for values in spec.axes.values())
    assert len({p.name for p in points}) == len(points)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_grids_base_configs_exist(name):
    spec = load_grid(find_grid(name))
    if "best_in_time.yaml" in spec.configs and not (configs_dir() / "best_in_time.yaml").is_file():
        pytest.skip("configs/best_in_time.yaml is not in the repository yet")
    points = expand(spec, "/tmp/timelit-sweep-test")
    assert all(Path(config).is_file() for point in points for config in point.configs)


def test_the_quickstart_sweep_is_three_quickstart_runs_that_differ_in_protocol():
    points = _points("quickstart")
    assert len(points) == 3
    assert load_grid(find_grid("quickstart")).configs == ["quickstart.yaml"]
    protocols = {(_effective(p, "protocol.init"), _effective(p, "protocol.deploy")) for p in points}
    assert protocols == {("ft", "ft"), ("ema", "ema"), ("zs", "all")}  # continual FT, Best-in-TIME, offline merge


def test_the_model_size_grid_names_open_clip_models_with_their_pretrained_tags():
    available = set(open_clip.list_pretrained())
    for point in _points("model_size"):
        model = (_effective(point, "model.init_args.model_name"), _effective(point, "model.init_args.pretrained"))
        assert model in available and model[0] == point.axes["model"]


def test_the_compute_grid_multiplies_fomo_in_flux_budget():
    for point in _points("compute"):
        multiple = float(point.axes["budget"].lstrip("x"))
        assert _effective(point, "budget.total_gflops") == pytest.approx(multiple * FOMO_GFLOPS)


def test_the_horizon_grid_spreads_the_same_budget_over_more_tasks():
    for point in _points("horizon"):
        assert _effective(point, "data.init_args.num_tasks") == int(point.axes["tasks"])
        assert _effective(point, "budget.total_gflops") == pytest.approx(FOMO_GFLOPS)
