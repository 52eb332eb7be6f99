"""timelit on a real (one-node, loopback) Slurm: an array sweep submitted by `timelit sweep`, and a job that is
requeued twice mid-task and still ends with the weights of a job that never was.

    .ci/install_slurm.sh && pytest -m slurm tests/integration/test_slurm.py

tests/slurm_cluster.py starts munged, slurmctld and slurmd for this module and stops them after it. The module is
skipped only when the Slurm or munge binaries are missing.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
slurm_cluster = importlib.import_module("slurm_cluster")

REPO = Path(__file__).resolve().parents[2]
PROBES = Path(__file__).resolve().parent  # probes.py, for --trainer.callbacks+=probes.SignalGate
MISSING = slurm_cluster.missing_binaries()
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
if MISSING:
    pytestmark.append(
        pytest.mark.skip(reason=f"Slurm is not installed (missing {', '.join(MISSING)}); run .ci/install_slurm.sh")
    )

FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def slurm():
    with slurm_cluster.running_slurm() as cluster:
        yield cluster


def run_sweep(args: list[str]) -> None:
    """`timelit sweep ARGS`, through the CLI once it has the subcommand, else through the function it will wire."""
    from timelit.commands import cli

    if "sweep" in cli.function_commands():
        cli.main(["sweep", *args])
        return
    from jsonargparse import CLI

    from timelit.commands.sweep import sweep_command

    CLI(sweep_command, args=args, as_positional=False)


def log_tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else f"({path} missing)"


def test_a_three_point_sweep_runs_as_one_array_job_and_is_not_submitted_twice(
    slurm, tiny_benchmark, tmp_path, monkeypatch, capsys
):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in {**slurm.env, **slurm_cluster.job_environment()}.items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "runs"
    overrides = slurm_cluster.tiny_overrides(tiny_benchmark, steps_per_task=4, every_n_train_steps=2, num_workers=0)
    args = [
        "--grid=quickstart",
        f"--root={root}",
        "--concurrency=2",
        f"--overrides={json.dumps(overrides)}",
        '--sbatch=["--cpus-per-task=1", "--time=00:30:00"]',
    ]
    run_sweep(args)
    out = capsys.readouterr().out
    job = re.search(r"submitted array job (\d+): 3 point\(s\)", out)
    assert job, out
    array_job = job.group(1)

    def all_finished():
        tasks = slurm.array_jobs(array_job)
        return len(tasks) == 3 and all(t["JobState"] in FINISHED for t in tasks) and tasks

    sweep_dir = root / "quickstart_sweep"
    try:
        tasks = slurm.wait(all_finished, 900, "the 3 array tasks to finish", poll=2)
    finally:
        logs = "\n".join(f"--- {p.name}\n{log_tail(p)}" for p in sorted((sweep_dir / "logs").glob("*.log")))
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2"]
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), logs
    assert len({t["ArrayJobId"] for t in tasks}) == 1  # one sbatch --array, not three jobs

    manifest = [json.loads(line) for line in (sweep_dir / "manifest.jsonl").read_text().splitlines()]
    expected = {"continual_ft": ("ft", "ft"), "best_in_time": ("ema", "ema"), "offline_merge": ("zs", "all")}
    for point in manifest:
        run_dir = Path(point["run_dir"])
        assert run_dir == sweep_dir / point["name"]
        results = json.loads((run_dir / "results.json").read_text())
        assert results["complete"] is True and [p["tasks_done"] for p in results["points"]] == [0, 1, 2]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        protocol = (config["protocol"]["init"], config["protocol"]["deploy"])
        assert protocol == expected[point["axes"]["protocol"]]
        assert (
            f"=== point {point['index']}: {point['name']}" in (sweep_dir / "logs" / f"{point['index']}.log").read_text()
        )

    jobs_before = slurm.run("scontrol", "show", "job", "--oneliner").count("JobId=")
    run_sweep(args)
    assert "nothing to submit" in capsys.readouterr().out
    assert slurm.run("scontrol", "show", "job", "--oneliner").count("JobId=") == jobs_before


def test_a_job_requeued_twice_mid_task_resumes_to_the_weights_of_an_uninterrupted_job(slurm, tiny_benchmark, tmp_path):
    steps, gates = 8, tmp_path / "gates"
    # The requeued job waits at two points until the signal has reached it (probes.SignalGate): mid task 0 (step 5)
    # and at the end of task 0, after its evaluation. Without the gates a run of 10-ms steps is past any chosen
    # point before `scontrol` returns on a loaded machine, and a signal sent while a requeued job is still importing
    # kills it before timelit's handlers exist.
    gated = [
        "--trainer.callbacks+=probes.SignalGate",
        f"--trainer.callbacks.marker_dir={gates}",
        "--trainer.callbacks.points=[step5,task0]",
    ]

    def submit(name: str, extra: list[str]) -> str:
        args = [
            "--config",
            "quickstart.yaml",
            *slurm_cluster.tiny_overrides(tiny_benchmark, steps_per_task=steps, every_n_train_steps=3, num_workers=1),
            f"--trainer.logger.init_args.save_dir={tmp_path / name}",
            "--trainer.logger.init_args.name=run",
            *extra,
        ]
        out = slurm.run(
            "sbatch",
            "--parsable",
            "--cpus-per-task=1",
            "--time=00:30:00",
            f"--job-name={name}",
            f"--output={tmp_path / name}.log",
            str(REPO / "slurm" / "train.sbatch"),
            *args,
            env={**slurm_cluster.job_environment(), "PYTHONPATH": str(PROBES)},
        )
        return out.strip().split(";")[0]

    reference, job = submit("reference", []), submit("requeued", gated)
    log = tmp_path / "requeued.log"

    def job_state():
        fields = slurm.job(job)
        return fields["JobState"], int(fields["Restarts"])

    # 1. `scontrol requeue` (what an admin or a preemption does): Slurm sends SIGTERM, the run saves and exits,
    #    Slurm puts the job back in the queue and starts it again.
    slurm.wait(lambda: (gates / "gate_step5").exists(), 600, f"the run to reach step 5\n{log_tail(log)}")
    slurm.run("scontrol", "requeue", job)
    slurm.wait(lambda: job_state() == ("RUNNING", 1), 300, f"the requeued job to start again\n{log_tail(log)}")
    assert "SIGTERM: stopped at step 5 (task 0, batch 5 of 8)" in log.read_text(), log_tail(log)

    # 2. SIGUSR1, as `--signal=USR1@N` sends before the time limit: the run saves and requeues itself.
    slurm.wait(lambda: (gates / "gate_task0").exists(), 600, f"the end of task 0\n{log_tail(log)}")
    slurm.run("scancel", "--signal=USR1", job)
    slurm.wait(lambda: job_state()[1] == 2, 300, f"the job to requeue itself\n{log_tail(log)}")
    second = f"SIGUSR1: stopped at step {steps} (task 0, after its evaluation); saved"
    assert second in log.read_text() and f"requeued Slurm job {job}" in log.read_text(), log_tail(log)

    # 3. Both jobs finish; the twice-stopped one resumed from its checkpoints to the same weights and results.
    for name, job_id in (("requeued", job), ("reference", reference)):
        slurm.wait(lambda j=job_id: slurm.job(j)["JobState"] in FINISHED, 900, f"{name} to finish", poll=2)
        fields = slurm.job(job_id)
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log_tail(tmp_path / f"{name}.log")
    assert slurm.job(job)["Restarts"] == "2"
    text = log.read_text()
    assert [int(r) for r in re.findall(r"\(restart (\d+)\)", text)] == [0, 1, 2]  # one log, appended to
    assert "resumed at step 5 (task 0)" in text and f"resumed at step {steps} (task 1)" in text

    run = tmp_path / "requeued" / "run"
    stopped = slurm_cluster.final_weights(run)
    assert stopped["global_step"] == str(2 * steps)
    assert stopped == slurm_cluster.final_weights(tmp_path / "reference" / "run")
    assert slurm_cluster.evaluations(run) == slurm_cluster.evaluations(tmp_path / "reference" / "run")


def test_array_tasks_take_over_a_stale_run_lock_and_stay_out_of_a_live_ones_run_directory(slurm, tmp_path):
    """slurm/array.sbatch's run lock against the real squeue: a lock of a job Slurm never knew is stale and taken
    over; a lock of a running job keeps the second job out of the run directory."""
    holder = slurm.run(
        "sbatch", "--parsable", "--cpus-per-task=1", f"--output={tmp_path}/holder.log", "--wrap=sleep 600"
    )
    holder = holder.strip().split(";")[0]
    try:
        slurm.wait(lambda: slurm.job(holder)["JobState"] == "RUNNING", 120, "the lock holder to run")
        fake_timelit = tmp_path / "timelit"
        fake_timelit.write_text('#!/bin/sh\ntouch "$2"\n')
        fake_timelit.chmod(0o755)
        points = []
        for index, lock_holder in enumerate(("999999", holder)):
            run_dir = tmp_path / f"point{index}"
            run_dir.mkdir()
            (run_dir / "slurm-job.lock").write_text(f"{lock_holder} 1_{index} elsewhere 2025-01-01T00:00:00\n")
            points.append(
                {"index": index, "name": f"p{index}", "run_dir": str(run_dir), "argv": ["fit", f"{run_dir}/ran"]}
            )
        manifest = tmp_path / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(p) + "\n" for p in points))
        array = slurm.run(
            "sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/%a.log",
            str(REPO / "slurm" / "array.sbatch"), str(manifest),
            env={**slurm_cluster.job_environment(), "TIMELIT": str(fake_timelit)},
        ).strip().split(";")[0]  # fmt: skip

        def both_finished():
            tasks = slurm.array_jobs(array)
            return len(tasks) == 2 and all(t["JobState"] in FINISHED for t in tasks) and tasks

        tasks = {t["ArrayTaskId"]: t for t in slurm.wait(both_finished, 300, "the two array tasks", poll=1)}
        logs = {i: log_tail(tmp_path / f"{i}.log") for i in ("0", "1")}
        assert (tasks["0"]["JobState"], tasks["0"]["ExitCode"]) == ("COMPLETED", "0:0"), logs["0"]
        assert "taking over" in logs["0"] and "from job 999999 (no longer known to Slurm)" in logs["0"]
        assert (tmp_path / "point0" / "ran").exists() and not (tmp_path / "point0" / "slurm-job.lock").exists()
        assert tasks["1"]["JobState"] == "FAILED", logs["1"]
        assert f"is held by job {holder} (RUNNING)" in logs["1"] and not (tmp_path / "point1" / "ran").exists()
        assert (tmp_path / "point1" / "slurm-job.lock").read_text().startswith(f"{holder} ")
    finally:
        slurm.run("scancel", holder, check=False)
