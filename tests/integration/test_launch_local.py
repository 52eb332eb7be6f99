"""`timelit sweep --launcher local` end to end: a 2-point sweep of real fits, stopped while one point is mid-task,
run again: the finished point is skipped, the stopped one resumes from its last.ckpt, both end complete.

Point 1 waits at step 5 of task 0 (probes.SignalGate) until a signal reaches it, so the stop lands mid-task however
slow the machine; the SIGTERM goes to the launcher, as Ctrl-C or a `kill` would, and the launcher passes it on.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
slurm_cluster = importlib.import_module("slurm_cluster")

pytestmark = pytest.mark.slow


def sweep(grid: Path, root: Path, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a Slurm job, even in one
    env.update(TIMELIT_LOG_LEVEL="INFO", PYTHONPATH=str(Path(__file__).resolve().parent))  # probes.SignalGate
    command = [str(slurm_cluster.VENV_BIN / "timelit"), "sweep", f"--grid={grid}", f"--root={root}"]
    with open(out, "w") as stdout:
        return subprocess.Popen(
            [*command, "--launcher=local", "--parallel=2"], env=env, stdout=stdout, stderr=subprocess.STDOUT
        )


def test_a_stopped_local_sweep_skips_its_finished_point_and_resumes_the_stopped_one(tiny_benchmark, tmp_path):
    gates, root = tmp_path / "gates", tmp_path / "runs"
    grid = tmp_path / "two.yaml"
    overrides = slurm_cluster.tiny_overrides(tiny_benchmark, steps_per_task=8, every_n_train_steps=3, num_workers=0)
    held = ["--trainer.callbacks+=probes.SignalGate", f"--trainer.callbacks.marker_dir={gates}"]
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "two",
                "configs": ["quickstart.yaml"],
                "overrides": [*overrides, "--trainer.enable_model_summary=false"],
                "axes": {
                    "point": {"free": ["--seed_everything=0"], "held": [*held, "--trainer.callbacks.points=[step5]"]}
                },
            }
        )
    )
    sweep_dir = root / "two"
    first_out, second_out = tmp_path / "first.out", tmp_path / "second.out"

    first = sweep(grid, root, first_out)
    deadline = time.monotonic() + 120
    while not ((gates / "gate_step5").exists() and re.search(r"done +0  point=free", first_out.read_text())):
        logs = "\n".join(p.read_text()[-2000:] for p in sorted((sweep_dir / "logs").glob("*.log")))
        assert first.poll() is None and time.monotonic() < deadline, f"{first_out.read_text()}\n{logs}"
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM, first_out.read_text()
    out = first_out.read_text()
    assert re.search(r"stopped +1  point=held: exit 143 ", out) and "1 finished, 0 failed, 1 stopped" in out
    held_log = sweep_dir / "logs" / "1.log"
    assert "SIGTERM: stopped at step 5 (task 0, batch 5 of 8)" in held_log.read_text()

    second = sweep(grid, root, second_out)
    assert second.wait(timeout=120) == 0, f"{second_out.read_text()}\n{held_log.read_text()[-3000:]}"
    out = second_out.read_text()
    assert re.search(r"0  point=free +complete", out) and re.search(r"1  point=held +resume", out)
    assert "1 finished, 0 failed, 0 stopped" in out and not re.search(r"start +0 ", out)
    assert "resumed at step 5 (task 0) from " in held_log.read_text()
    assert (sweep_dir / "logs" / "0.log").read_text().count("=== point 0") == 1  # run once
    for name in ("point=free", "point=held"):
        results = json.loads((sweep_dir / name / "results.json").read_text())
        assert results["complete"] is True and [p["tasks_done"] for p in results["points"]] == [0, 1, 2]
