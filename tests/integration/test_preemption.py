"""Preemption end to end: `timelit fit` stopped by SIGTERM in task 1, resumed, stopped by SIGUSR1 in task 2, resumed
again, ends with the same weights, bit for bit, and the same results as a run that was never stopped.

The signals go to the whole process group, as Slurm sends them to every process of a job step: the loader worker
must ignore them and the main process must save `last.ckpt` at the next batch boundary and exit with 128 + signal.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
slurm_cluster = importlib.import_module("slurm_cluster")

pytestmark = pytest.mark.slow

STEPS, EVERY_N = 8, 3  # 2 tasks of 8 steps; StreamCheckpoint saves at global steps 3, 6, 9, ... and at task ends


def start(
    data: Path, save_dir: Path, log: Path, gates: Path | None = None, launcher: list[str] | None = None
) -> subprocess.Popen:
    """`timelit fit` of two tiny tasks; with `gates`, it waits for a signal mid task 0 (step 5) and at task 0's end
    (probes.SignalGate), so each signal lands at a known point however slow the machine. `launcher` replaces the
    `timelit` executable (a script that calls timelit.commands.cli.main with the rest of the command line)."""
    command = [
        *(launcher or [str(slurm_cluster.VENV_BIN / "timelit")]),
        "fit",
        "--config",
        "quickstart.yaml",
        *slurm_cluster.tiny_overrides(data, steps_per_task=STEPS, every_n_train_steps=EVERY_N, num_workers=1),
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.logger.init_args.name=run",
    ]
    if gates is not None:
        command += [
            "--trainer.callbacks+=probes.SignalGate",
            f"--trainer.callbacks.marker_dir={gates}",
            "--trainer.callbacks.points=[step5,task0]",
        ]
    # Not a Slurm job, even when the tests run inside one: SIGUSR1 must not requeue the test's own job.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", TIMELIT_LOG_LEVEL="INFO", PYTHONPATH=str(Path(__file__).resolve().parent))
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, cwd=save_dir.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(condition, process: subprocess.Popen, log: Path, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"waited {timeout} s for {what}:\n{log.read_text()[-3000:]}")


def tasks_evaluated(run: Path) -> int:
    try:
        return max(p["tasks_done"] for p in json.loads((run / "results.json").read_text())["points"])
    except (OSError, ValueError, KeyError):
        return -1


def test_stopped_twice_and_resumed_it_ends_with_the_weights_of_an_uninterrupted_run(tiny_benchmark, tmp_path):
    (tmp_path / "reference").mkdir()
    (tmp_path / "stopped").mkdir()
    reference_log, log = tmp_path / "reference.log", tmp_path / "stopped.log"
    reference = start(tiny_benchmark, tmp_path / "reference", reference_log)
    run = tmp_path / "stopped" / "run"

    # 1. SIGTERM in task 1 (index 0), at step 5: after the periodic save at step 3, two steps before the next.
    gates = tmp_path / "gates"
    first = start(tiny_benchmark, tmp_path / "stopped", log, gates)
    wait_for(lambda: (gates / "gate_step5").exists(), first, log, "step 5")
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    first_stop = slurm_cluster.checkpoint_step(run)
    assert first_stop == 5, f"expected the stop at step 5, in the middle of task 1, at step {first_stop}"
    assert "SIGTERM: stopped at step 5 (task 0, batch 5 of 8)" in log.read_text()

    # 2. The same command resumes; SIGUSR1 after task 1's evaluation stops it at its task-end checkpoint.
    second = start(tiny_benchmark, tmp_path / "stopped", log, gates)
    wait_for(lambda: (gates / "gate_task0").exists(), second, log, "the evaluation after task 1")
    assert tasks_evaluated(run) == 1
    os.killpg(second.pid, signal.SIGUSR1)
    assert second.wait(timeout=300) == 128 + signal.SIGUSR1, log.read_text()[-3000:]
    second_stop = slurm_cluster.checkpoint_step(run)
    assert second_stop == STEPS, f"expected the stop at the end of task 1 (step {STEPS}), at step {second_stop}"
    assert f"SIGUSR1: stopped at step {STEPS} (task 0, after its evaluation)" in log.read_text()
    assert "SIGUSR1: not a Slurm job, so not requeued" in log.read_text()
    assert f"resumed at step {first_stop} (task 0)" in log.read_text()

    # 3. Resumed again, it finishes; so does the run that was never stopped.
    third = start(tiny_benchmark, tmp_path / "stopped", log)
    assert third.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert f"resumed at step {second_stop} (task 1)" in log.read_text()
    assert reference.wait(timeout=600) == 0, reference_log.read_text()[-3000:]

    stopped, uninterrupted = (
        slurm_cluster.final_weights(run),
        slurm_cluster.final_weights(tmp_path / "reference" / "run"),
    )
    assert stopped["global_step"] == str(2 * STEPS)
    assert stopped == uninterrupted
    assert slurm_cluster.evaluations(run) == slurm_cluster.evaluations(tmp_path / "reference" / "run")
    assert json.loads((run / "results.json").read_text())["complete"] is True


_SIGNAL_DURING_STARTUP = """
import os, signal, sys
import timelit.commands.cli as cli

start_lightning = cli.run_lightning

def signalled_while_starting(args):
    assert "lightning" not in sys.modules  # torch and Lightning are still to be imported: seconds of start-up
    os.kill(os.getpid(), signal.SIGUSR1)
    return start_lightning(args)

cli.run_lightning = signalled_while_starting
cli.main(sys.argv[1:])
"""


def test_a_requeue_signal_while_fit_starts_stops_it_at_the_first_batch(tiny_benchmark, tmp_path):
    """SIGUSR1 before Lightning is even imported (a requeued job warned of its time limit at once, or an early
    `scancel --signal=USR1`): the run saves at its first batch and exits 138. Without timelit.utilities.early_signals
    the default action of SIGUSR1 ended the process (status -10) and a Slurm job with it, never requeued."""
    (tmp_path / "starting").mkdir()
    log = tmp_path / "fit.log"
    process = start(tiny_benchmark, tmp_path / "starting", log, launcher=[sys.executable, "-c", _SIGNAL_DURING_STARTUP])
    returncode = process.wait(timeout=600)
    text = log.read_text()
    assert returncode == 128 + signal.SIGUSR1, text[-3000:]
    assert "SIGUSR1 arrived while the run was starting" in text
    assert "SIGUSR1: stopped at step 1 (task 0, batch 1 of 8)" in text
    assert slurm_cluster.checkpoint_step(tmp_path / "starting" / "run") == 1
