"""timelit sweep --launcher local: the unfinished points run here, at most N at once, in the Slurm launcher's run
folders; a stopped sweep resumes; two launchers never run one point; sbatch-only options are refused.

A fake `timelit` (TIMELIT, as slurm/array.sbatch reads it) records each call and behaves as the test says: finish,
fail, or save a last.ckpt and wait for SIGTERM like timelit's Preemption callback. tests/integration/
test_launch_local.py runs real fits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from timelit.commands.sweep import LauncherOptionError, sweep_command
from timelit.study.grid import GridError, load_grid
from timelit.study.local import LOCK_FILE, RunLock, cores
from timelit.study.manifest import manifest_text
from timelit.study.plan import expand

FAKE_TIMELIT = """#!{python}
import json, os, signal, sys, time
from pathlib import Path

args = sys.argv[1:]
run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir=")))
calls = Path(os.environ["FAKE_CALLS"])
behaviour = json.loads((calls / "behave.json").read_text()).get(run_dir.name, "ok")
ckpt = run_dir / "checkpoints" / "last.ckpt"
with open(calls / f"{{run_dir.name}}.{{os.getpid()}}.json", "w") as record:
    json.dump({{"argv": args, "omp": os.environ.get("OMP_NUM_THREADS"), "resumed": ckpt.exists()}}, record)
print("fake fit: resuming from last.ckpt" if ckpt.exists() else "fake fit: from scratch", flush=True)
running = calls / "running"
running.mkdir(exist_ok=True)
(running / str(os.getpid())).touch()
peak = calls / f"peak.{{os.getpid()}}"
peak.write_text(str(len(list(running.iterdir()))))
try:
    if behaviour == "fail":
        print("fake fit: boom", file=sys.stderr)
        sys.exit(3)
    if behaviour == "hold":  # like Preemption: last.ckpt, then exit 143 on SIGTERM
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_text("step 5")
        (calls / f"held.{{run_dir.name}}").touch()
        time.sleep(60)
        sys.exit(1)
    time.sleep(0.4)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps({{"complete": True, "points": []}}))
finally:
    (running / str(os.getpid())).unlink()
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake timelit on TIMELIT; returns (calls dir, set_behaviour(dict), calls(name) -> list of records)."""
    calls = tmp_path / "calls"
    calls.mkdir()
    (calls / "behave.json").write_text("{}")
    script = tmp_path / "timelit"
    script.write_text(FAKE_TIMELIT.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("TIMELIT", str(script))
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def behave(mapping: dict[str, str]) -> None:
        (calls / "behave.json").write_text(json.dumps(mapping))

    def records(name: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(calls.glob(f"{name}.*.json"))]

    return calls, behave, records


@pytest.fixture
def grid(tmp_path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(
        "name: local\noverrides: [--trainer.max_epochs=2]\n"
        "axes:\n  seed: {key: seed_everything, values: [0, 1, 2, 3]}\n"
        "sbatch: [--cpus-per-task=2]\nsignal_seconds: 900\n"
    )
    return path


def complete(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps({"complete": True, "points": []}))


def local(grid: Path, root: Path, **options) -> None:
    sweep_command(str(grid), root=str(root), launcher="local", **options)


def test_runs_the_unfinished_points_at_most_n_at_once_in_the_slurm_launchers_folders(grid, tmp_path, fake, capsys):
    calls, _, records = fake
    root, sweep = tmp_path / "runs", tmp_path / "runs" / "local"
    complete(sweep / "seed=0")
    local(grid, root, parallel=2)
    out = capsys.readouterr().out
    assert re.search(r"0  seed=0 +complete", out) and re.search(r"3  seed=3 +run", out)
    assert not records("seed=0")
    points = expand(load_grid(grid), root)
    assert (sweep / "manifest.jsonl").read_text() == manifest_text(points)  # as the Slurm launcher writes it
    assert (sweep / "grid.yaml").read_text() == grid.read_text()
    for point in points[1:]:
        (record,) = records(point.name)
        assert record["argv"] == point.argv  # slurm/array.sbatch's command line
        assert record["omp"] == str(max(1, cores() // 2))
        assert json.loads((Path(point.run_dir) / "results.json").read_text())["complete"] is True
        assert not (Path(point.run_dir) / LOCK_FILE).exists()
        log = (sweep / "logs" / f"{point.index}.log").read_text()
        assert f"=== point {point.index}: {point.name} -> {point.run_dir}" in log and "fake fit: from scratch" in log
        assert log.rstrip().splitlines()[-1].startswith("=== exit 0 after ")
        assert re.search(rf"done +{point.index}  {point.name}: exit 0 after [\d.]+ s", out)
    assert max(int(p.read_text()) for p in calls.glob("peak.*")) <= 2
    assert "local sweep: 3 finished, 0 failed, 0 stopped" in out

    local(grid, root, parallel=2)
    assert "nothing to run" in capsys.readouterr().out and len(list(calls.glob("seed=*.json"))) == 3


def test_a_failed_run_fails_the_sweep_and_is_named_with_its_log(grid, tmp_path, fake, capsys):
    _, behave, records = fake
    behave({"seed=1": "fail"})
    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as stopped:
        local(grid, root, parallel=1)
    assert stopped.value.code == 1
    out = capsys.readouterr().out
    log = root / "local" / "logs" / "1.log"
    assert f"failed     1  seed=1: exit 3; log {log}" in out and "3 finished, 1 failed" in out
    assert "fake fit: boom" in log.read_text() and all(records(f"seed={i}") for i in (0, 2, 3))

    behave({})
    local(grid, root, parallel=1)  # again: only the failed point runs
    out = capsys.readouterr().out
    assert re.search(r"1  seed=1 +run", out) and "1 finished, 0 failed" in out


def test_sigterm_stops_the_running_fits_and_the_next_sweep_resumes_them(grid, tmp_path, fake, capsys):
    calls, behave, records = fake
    behave({"seed=0": "hold", "seed=1": "hold"})
    root = tmp_path / "runs"
    out_path = tmp_path / "launcher.out"
    code = "import sys; from timelit.commands.cli import main; main(sys.argv[1:])"
    argv = ["sweep", f"--grid={grid}", f"--root={root}", "--launcher=local", "--parallel=2"]
    with open(out_path, "w") as out:
        launcher = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not all((calls / f"held.seed={i}").exists() for i in (0, 1)):
        assert launcher.poll() is None and time.monotonic() < deadline, out_path.read_text()
        time.sleep(0.05)
    lock = (root / "local" / "seed=0" / LOCK_FILE).read_text()
    assert f"launcher pid {launcher.pid}, fit pid " in lock
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
    text = out_path.read_text()
    assert "SIGTERM: SIGTERM to 2 running fit(s)" in text
    assert re.search(r"stopped +0  seed=0: exit 143 .*resumes when the sweep runs again", text)
    assert "0 finished, 0 failed, 2 stopped, 2 not started" in text and not records("seed=2")
    assert not (root / "local" / "seed=0" / LOCK_FILE).exists()

    behave({})
    local(grid, root, parallel=2)
    out = capsys.readouterr().out
    assert re.search(r"0  seed=0 +resume", out) and re.search(r"2  seed=2 +run", out)
    assert re.search(r"start +0  seed=0 \(resume from last.ckpt", out) and "4 finished" in out
    assert [r["resumed"] for r in records("seed=0")] == [False, True]
    log = (root / "local" / "logs" / "0.log").read_text()
    assert "=== exit 143 after" in log and "resuming from " in log and "fake fit: resuming from last.ckpt" in log


def test_a_point_another_launcher_runs_is_left_to_it_and_a_dead_ones_lock_is_taken_over(grid, tmp_path, fake, capsys):
    _, _, records = fake
    root = tmp_path / "runs"
    held = RunLock.take(root / "local" / "seed=1")  # another launcher, alive: this process
    assert isinstance(held, RunLock)
    try:
        local(grid, root, parallel=2)
    finally:
        held.release()
    out = capsys.readouterr().out
    assert re.search(rf"1  seed=1 +running elsewhere \(host .*, launcher pid {os.getpid()}, since ", out)
    assert not records("seed=1") and all(records(f"seed={i}") for i in (0, 2, 3))
    again = RunLock.take(root / "local" / "seed=1")  # released: anyone may take it
    assert isinstance(again, RunLock)
    again.release()

    # A launcher killed with SIGKILL leaves its lock file, but the kernel dropped its flock: taken over.
    stale = root / "local" / "seed=1" / LOCK_FILE
    stale.write_text("host elsewhere, launcher pid 999999, since yesterday\n")
    local(grid, root, parallel=2)
    out = capsys.readouterr().out
    assert re.search(r"1  seed=1 +run", out) and "left by host elsewhere, launcher pid 999999" in out
    assert len(records("seed=1")) == 1 and not stale.exists()


@pytest.mark.parametrize(
    ("option", "hint"),
    [
        ({"concurrency": 2}, "use --parallel N"),
        ({"sbatch": ["--time=01:00:00"]}, "runs `timelit fit` directly"),
        ({"signal_seconds": 600}, "no time limit"),
        ({"script": "x.sbatch"}, "set TIMELIT"),
        ({"ignore_queue": True}, "asks no queue"),
    ],
)
def test_sbatch_only_options_are_refused_under_the_local_launcher(grid, tmp_path, fake, option, hint):
    (name,) = option
    with pytest.raises(LauncherOptionError, match=rf"--launcher local does not take --{name} \(.*{re.escape(hint)}"):
        local(grid, tmp_path / "runs", **option)
    with pytest.raises(LauncherOptionError, match=r"--parallel is the local launcher's .* --concurrency N"):
        sweep_command(str(grid), root=str(tmp_path / "runs"), parallel=2)
    assert not (tmp_path / "runs").exists()


def test_a_dry_run_shows_the_commands_and_a_changed_grid_is_refused(grid, tmp_path, fake, capsys):
    root = tmp_path / "runs"
    local(grid, root, parallel=2, dry_run=True, only=["seed=1"])
    out = capsys.readouterr().out
    assert not root.exists() and "seed=0" not in out
    assert re.search(r"\[1\] .*timelit fit --trainer.max_epochs=2 --seed_everything=1 ", out)

    local(grid, root, parallel=4)
    grid.write_text(grid.read_text().replace("2, 3]", "2, 3, 4]"))
    with pytest.raises(GridError, match=r"manifest.jsonl differs from what .* expands to now"):
        local(grid, root, parallel=4)


def test_the_help_shows_the_launcher_and_its_threads(capsys):
    from timelit.commands import cli

    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--launcher {slurm,local}" in out and "OMP_NUM_THREADS=max(1, cores // parallel)" in out
