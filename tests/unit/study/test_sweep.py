"""timelit sweep: grids expand to the intended runs, the array job is submitted once, finished points are skipped.

A fake `sbatch` and `squeue` on PATH record what would reach Slurm; tests/integration/test_slurm.py runs the same
command against a real one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
from pathlib import Path

import open_clip
import pytest
import yaml

from timelit.commands.sweep import sweep_command
from timelit.study.grid import GridError, find_grid, load_grid
from timelit.study.plan import expand
from timelit.study.slurm import ACTIVE_STATES, FINISHED_STATES, QueueError, array_spec
from timelit.utilities.resources import configs_dir

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
    """`sbatch` that records its arguments (the last call in `sbatch_calls`, every call in `sbatch_log`, separated
    by `---`) and prints a job id; `squeue` that prints the file `queue` and exits with the status in `squeue_status`
    (with an error message when it is not 0)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls, queue, status = tmp_path / "sbatch_calls", tmp_path / "queue", tmp_path / "squeue_status"
    queue.write_text("")
    status.write_text("0")
    log = tmp_path / "sbatch_log"
    scripts = {
        "sbatch": f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\nprintf "%s\\n" "$@" --- >> {log}\necho 4242\n',
        "squeue": (
            f'#!/bin/sh\ncode=$(cat {status})\n[ "$code" = 0 ] || echo "squeue: error: Unable to contact slurm '
            f'controller (connect failure)" >&2\ncat {queue}\nexit "$code"\n'
        ),
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
    assert not (tmp_path / "runs").exists()  # planning writes nothing: the launchers do
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


def sbatch_calls(tmp_path: Path) -> list[list[str]]:
    text = (tmp_path / "sbatch_log").read_text() if (tmp_path / "sbatch_log").exists() else ""
    return [call.strip("\n").split("\n") for call in text.split("---\n") if call.strip()]


def test_a_failing_squeue_submits_nothing_unless_told_to_ignore_the_queue(grid, tmp_path, fake_slurm, capsys):
    calls, _ = fake_slurm
    (tmp_path / "squeue_status").write_text("1")
    root = tmp_path / "runs"
    with pytest.raises(QueueError, match=r"Unable to contact slurm controller.*--ignore_queue true") as error:
        sweep_command(str(grid), root=str(root))
    assert "would submit those again: nothing submitted" in str(error.value)
    assert not calls.exists() and not (root / "study" / "manifest.jsonl").exists()

    sweep_command(str(grid), root=str(root), dry_run=True)  # a dry run still shows what it would do
    assert "submit (queue unknown)" in capsys.readouterr().out and not calls.exists()

    sweep_command(str(grid), root=str(root), ignore_queue=True)
    assert "--array=0-2" in calls.read_text().splitlines()


def test_without_squeue_on_path_nothing_is_submitted(grid, tmp_path, fake_slurm, monkeypatch):
    calls, _ = fake_slurm
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None if name == "squeue" else which(name))
    with pytest.raises(QueueError, match="squeue is not on PATH"):
        sweep_command(str(grid), root=str(tmp_path / "runs"))
    assert not calls.exists()


def test_only_points_in_an_active_state_count_as_queued(grid, tmp_path, fake_slurm, capsys):
    """squeue keeps finished jobs visible for MinJobAge: OUT_OF_MEMORY, NODE_FAIL, PREEMPTED... will not run again."""
    calls, queue = fake_slurm
    for active in ("PENDING", "REQUEUED", "COMPLETING", "REQUEUE_HOLD"):
        for finished in ("OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
            queue.write_text(f"0 {active}\n1 {finished}\n2 COMPLETED\n")
            sweep_command(str(grid), root=str(tmp_path / "runs"))
            assert "--array=1-2" in calls.read_text().splitlines(), (active, finished)
            assert re.search(rf"size=tiny,seed=0 +queued or running \({active}\)", capsys.readouterr().out)


def test_an_unknown_state_is_never_taken_for_finished(grid, tmp_path, fake_slurm, caplog):
    calls, queue = fake_slurm
    queue.write_text("0 SOME_NEW_STATE\n")
    sweep_command(str(grid), root=str(tmp_path / "runs"))
    assert "--array=1-2" in calls.read_text().splitlines()
    assert "state 'SOME_NEW_STATE', unknown to timelit: counted as active" in caplog.text


def test_active_and_finished_states_cover_slurms_job_states_once():
    # squeue(1), "JOB STATE CODES" (Slurm 22.05, Debian 12's, as the Slurm tests use)
    documented = {
        "BOOT_FAIL", "CANCELLED", "COMPLETED", "CONFIGURING", "COMPLETING", "DEADLINE", "FAILED", "NODE_FAIL",
        "OUT_OF_MEMORY", "PENDING", "PREEMPTED", "RUNNING", "RESV_DEL_HOLD", "REQUEUE_FED", "REQUEUE_HOLD",
        "REQUEUED", "RESIZING", "REVOKED", "SIGNALING", "SPECIAL_EXIT", "STAGE_OUT", "STOPPED", "SUSPENDED",
        "TIMEOUT",
    }  # fmt: skip
    assert documented == ACTIVE_STATES | FINISHED_STATES and not ACTIVE_STATES & FINISHED_STATES


@pytest.mark.parametrize(
    "option", ["--job-name=mine", "-J", "-Jmine", "--job-name mine", "--job-na=mine", "--array=0-3", "-a"]
)
def test_the_job_name_and_array_are_timelits_own(grid, tmp_path, fake_slurm, option):
    calls, _ = fake_slurm
    with pytest.raises(GridError, match=r"--sbatch: .* which timelit sweep sets itself") as error:
        sweep_command(str(grid), root=str(tmp_path / "runs"), sbatch=[option, "mine"])
    assert not calls.exists()
    if "-J" in option or "--job" in option:
        assert "squeue finds the sweep's queued tasks by it" in str(error.value)
    grid.write_text(grid.read_text().replace("sbatch: [--cpus-per-task=2]", f"sbatch: ['{option}']"))
    with pytest.raises(GridError, match=rf"{re.escape(str(grid))}: sbatch: '{re.escape(option)}' sets"):
        sweep_command(str(grid), root=str(tmp_path / "runs"))


def test_options_that_look_alike_are_not_refused(grid, tmp_path, fake_slurm):
    calls, _ = fake_slurm
    sweep_command(str(grid), root=str(tmp_path / "runs"), sbatch=["--account=abc", "-A", "abc", "--jobid-x=1"])
    assert "--account=abc" in calls.read_text().splitlines()


def test_points_with_other_resources_go_into_their_own_array_job(grid, tmp_path, fake_slurm, capsys):
    grid.write_text(
        grid.read_text()
        + 'resources:\n  "size=micro,*": [--gpus-per-node=4, --ntasks-per-node=4, --cpus-per-task=8]\n'
        + "signal_seconds: 1800\n"
    )
    root = tmp_path / "runs"
    sweep_command(str(grid), root=str(root), sbatch=["--time=01:00:00", "--ntasks-per-node=2"])
    first, second = sbatch_calls(tmp_path)
    assert first[1] == "--array=0" and second[1] == "--array=1-2"
    assert first[2] == second[2] and first[2].startswith("--job-name=timelit-study-")  # one name: one queue check
    assert first[6:-2] == ["--signal=USR1@1800", "--cpus-per-task=2", "--time=01:00:00", "--ntasks-per-node=2"]
    # resources after `sbatch:` and the user's --sbatch after both; one value per option
    assert second[6:-2] == [
        "--signal=USR1@1800",
        "--cpus-per-task=8",
        "--gpus-per-node=4",
        "--ntasks-per-node=2",
        "--time=01:00:00",
    ]
    out = capsys.readouterr().out
    assert "submitted array job 4242: 1 point(s) (--cpus-per-task=2)" in out
    assert "submitted array job 4242: 2 point(s) (--cpus-per-task=8 --gpus-per-node=4 --ntasks-per-node=4)" in out

    (tmp_path / "sbatch_log").unlink()
    sweep_command(str(grid), root=str(root), signal_seconds=600, rewrite_manifest=True)
    assert all("--signal=USR1@600" in call for call in sbatch_calls(tmp_path))


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


def test_the_model_size_grid_gives_every_model_a_shape_that_splits_the_batch():
    """ViT-L/H/g at batch 512 do not fit one GPU: they get their own array jobs with more GPUs, one rank per GPU,
    and the global batch divides over the ranks."""
    spec = load_grid(find_grid("model_size"))
    gpus = {}
    for point in _points("model_size"):
        options = dict(o.lstrip("-").split("=", 1) for o in spec.sbatch_for(point.name))
        assert options["ntasks-per-node"] == options["gpus-per-node"], point.name
        gpus[point.axes["model"]] = int(options["nodes"]) * int(options["gpus-per-node"])
    assert all(512 % n == 0 for n in gpus.values())
    assert gpus["ViT-B-32"] == gpus["ViT-B-16"] == 1 and gpus["ViT-L-14"] >= 4
    assert gpus["ViT-H-14"] >= 8 and gpus["ViT-g-14"] >= 8
    assert spec.signal_seconds == 1800


def test_a_config_named_like_a_grid_beside_the_grid_is_the_shipped_config(tmp_path):
    """configs/sweeps/ holds a grid named quickstart.yaml; in a grid there, quickstart.yaml means the fit config."""
    seeds = "axes: {seed: {key: seed_everything, values: [0, 1]}}\n"
    (tmp_path / "quickstart.yaml").write_text("name: other\nconfigs: []\n" + seeds)
    grid = tmp_path / "study.yaml"
    grid.write_text("name: study\nconfigs: [quickstart.yaml]\n" + seeds)
    (point, _) = expand(load_grid(grid), tmp_path / "runs")
    assert point.argv[2] == str((configs_dir() / "quickstart.yaml").resolve())
    assert [p.name for p in expand(load_grid(find_grid("science")), tmp_path / "runs")][:2] == [
        "protocol=ft_ft,seed=0",
        "protocol=ft_ft,seed=1",
    ]
