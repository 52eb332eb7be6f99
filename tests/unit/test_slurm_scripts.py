"""slurm/array.sbatch and slurm/train.sbatch run by bash with fake `srun`, `squeue` and `timelit` on PATH: what
srun is given (CPUs per task, the GPU accelerator), and the run lock that keeps two jobs out of one run directory.

tests/integration/test_slurm.py runs the same scripts under a real Slurm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from timelit.study.slurm import ACTIVE_STATES

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"
ME = "501"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the sbatch scripts are bash scripts")


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


class Fakes:
    """A bin folder with srun (records its options, runs the command), squeue (answers from `squeue_answer`) and
    timelit (records its arguments and the lock it runs under, exits with `timelit_status`)."""

    def __init__(self, root: Path):
        self.root, self.bin = root, root / "bin"
        self.bin.mkdir()
        self.run_dir = root / "runs" / "sweep" / "point"
        self.squeue_answer = root / "squeue_answer"
        self.squeue_calls = root / "squeue_calls"
        self.srun_args, self.timelit_args = root / "srun_args", root / "timelit_args"
        self.lock_seen = root / "lock_during_run"
        self.timelit_status = root / "timelit_status"
        self.timelit_status.write_text("0")
        executable(
            self.bin / "srun",
            f'#!/bin/bash\nprintf "%s\\n" "$@" > {self.srun_args}\n'
            'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',
        )
        # squeue_answer: "state STATE", "gone" (Slurm forgot the job) or "down" (no controller)
        executable(
            self.bin / "squeue",
            f'#!/bin/bash\necho "$@" >> {self.squeue_calls}\nread -r kind value < {self.squeue_answer}\n'
            'case "$kind" in\n'
            '  state) echo "$value" ;;\n'
            '  gone) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;\n'
            '  down) echo "squeue: error: Unable to contact slurm controller (connect failure)" >&2; exit 1 ;;\n'
            "esac\n",
        )
        executable(
            self.bin / "timelit",
            f'#!/bin/bash\nprintf "%s\\n" "$@" > {self.timelit_args}\n'
            f'cat "{self.run_dir}/slurm-job.lock" > {self.lock_seen} 2>/dev/null || true\n'
            f"exit $(cat {self.timelit_status})\n",
        )

    @property
    def lock(self) -> Path:
        return self.run_dir / "slurm-job.lock"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            TIMELIT=str(self.bin / "timelit"),
            TIMELIT_SQUEUE_RETRY_S="0",
            SLURM_JOB_ID=ME,
            SLURM_ARRAY_JOB_ID="500",
            SLURM_ARRAY_TASK_ID="0",
            SLURM_JOB_NODELIST="node1",
        )
        env.update(extra)
        return env

    def array(self, argv: list[str] | None = None, **env: str) -> subprocess.CompletedProcess:
        manifest = self.root / "manifest.jsonl"
        point = {"index": 0, "name": "point", "run_dir": str(self.run_dir), "argv": argv or ["fit", "--config", "x"]}
        manifest.write_text(json.dumps(point) + "\n")
        return self._bash("array.sbatch", [str(manifest)], env)

    def train(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return self._bash("train.sbatch", list(args or ("--config", "x")), env)

    def _bash(self, script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SLURM_DIR / script), *args],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=self.root,
        )

    def ran(self) -> list[str] | None:
        return self.timelit_args.read_text().splitlines() if self.timelit_args.exists() else None


@pytest.fixture
def fakes(tmp_path) -> Fakes:
    return Fakes(tmp_path)


# ---------------------------------------------------------------------------------------------------- srun's options


@pytest.mark.parametrize("script", ["array", "train"])
def test_srun_gets_the_cpus_per_task_of_the_allocation(fakes, script):
    """Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch: without it each rank has one CPU."""
    run = getattr(fakes, script)
    assert run(SLURM_CPUS_PER_TASK="8").returncode == 0
    assert "--cpus-per-task=8" in fakes.srun_args.read_text().splitlines()
    assert run().returncode == 0
    assert not any(a.startswith("--cpus-per-task") for a in fakes.srun_args.read_text().splitlines())


@pytest.mark.parametrize("script", ["array", "train"])
@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ({"SLURM_GPUS_ON_NODE": "4"}, True),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, True),
        ({"SLURM_GPUS_ON_NODE": "0"}, False),
        ({}, False),
    ],
)
def test_a_gpu_allocation_trains_on_the_gpu_or_fails(fakes, script, gpus, expected):
    """`accelerator: auto` falls back to the CPU when CUDA is broken; with GPUs allocated, ask for them."""
    assert getattr(fakes, script)(**gpus).returncode == 0
    assert ("--trainer.accelerator=gpu" in fakes.ran()) == expected


def test_a_points_own_accelerator_wins(fakes):
    result = fakes.array(["fit", "--trainer.accelerator=cpu"], SLURM_GPUS_ON_NODE="4")
    assert result.returncode == 0 and [a for a in fakes.ran() if "accelerator" in a] == ["--trainer.accelerator=cpu"]
    assert fakes.train("--config", "x", "--trainer.accelerator", "cpu", SLURM_GPUS_ON_NODE="4").returncode == 0
    assert "--trainer.accelerator=gpu" not in fakes.ran()


def test_ddp_devices_follow_the_tasks_per_node(fakes):
    assert fakes.array(SLURM_NTASKS_PER_NODE="4(x2)", SLURM_JOB_NUM_NODES="2").returncode == 0
    assert fakes.ran()[-2:] == ["--trainer.devices=4", "--trainer.num_nodes=2"]


# ---------------------------------------------------------------------------------------------------- the run lock


def test_a_point_runs_under_a_lock_naming_its_job_and_releases_it(fakes):
    result = fakes.array()
    assert result.returncode == 0, result.stderr
    assert fakes.ran() == ["fit", "--config", "x"]
    assert fakes.lock_seen.read_text().split()[:2] == [ME, "500_0"]
    assert not fakes.lock.exists() and not list(fakes.run_dir.glob("slurm-job.lock*"))
    assert not fakes.squeue_calls.exists()  # no lock to judge, no question to Slurm


def test_the_lock_is_released_when_the_run_stops_for_a_requeue(fakes):
    fakes.timelit_status.write_text("138")
    assert fakes.array().returncode == 138
    assert fakes.lock_seen.read_text().startswith(ME) and not fakes.lock.exists()


@pytest.mark.parametrize("state", ["RUNNING", "PENDING", "REQUEUED", "COMPLETING", "REQUEUE_HOLD"])
def test_a_lock_held_by_a_live_job_keeps_a_second_job_out(fakes, state):
    fakes.run_dir.mkdir(parents=True)
    fakes.lock.write_text("77 70_0 othernode 2025-01-01T00:00:00\n")
    fakes.squeue_answer.write_text(f"state {state}\n")
    result = fakes.array()
    assert result.returncode == 1 and fakes.ran() is None
    assert f"is held by job 77 ({state}): point 0 runs there already, not twice" in result.stderr
    assert fakes.lock.read_text().startswith("77 ") and "--jobs=77" in fakes.squeue_calls.read_text()
    assert sorted(p.name for p in fakes.run_dir.iterdir()) == ["slurm-job.lock"]


@pytest.mark.parametrize(
    ("answer", "said"),
    [("state COMPLETED", "COMPLETED"), ("state OUT_OF_MEMORY", "OUT_OF_MEMORY"), ("gone", "no longer known")],
)
def test_a_stale_lock_of_a_job_that_ended_is_taken_over(fakes, answer, said):
    fakes.run_dir.mkdir(parents=True)
    fakes.lock.write_text("77 70_0 othernode 2025-01-01T00:00:00\n")
    fakes.squeue_answer.write_text(answer + "\n")
    result = fakes.array()
    assert result.returncode == 0, result.stderr
    assert f"taking over {fakes.lock} from job 77 ({said}" in result.stdout
    assert fakes.lock_seen.read_text().startswith(f"{ME} ") and not fakes.lock.exists()
    assert list(fakes.run_dir.iterdir()) == []


def test_a_requeued_job_takes_its_own_lock_back(fakes):
    fakes.run_dir.mkdir(parents=True)
    fakes.lock.write_text(f"{ME} 500_0 node1 2025-01-01T00:00:00\n")  # left when Slurm killed the job to requeue
    assert fakes.array().returncode == 0 and fakes.ran() is not None
    assert not fakes.squeue_calls.exists() and not fakes.lock.exists()


def test_when_squeue_cannot_answer_the_point_does_not_start(fakes):
    fakes.run_dir.mkdir(parents=True)
    fakes.lock.write_text("77 70_0 othernode 2025-01-01T00:00:00\n")
    fakes.squeue_answer.write_text("down\n")
    result = fakes.array()
    assert result.returncode == 1 and fakes.ran() is None
    assert "squeue cannot say whether job 77" in result.stderr and "Unable to contact" in result.stderr
    assert len(fakes.squeue_calls.read_text().splitlines()) == 3  # tried three times
    assert fakes.lock.read_text().startswith("77 ")


def test_a_complete_point_exits_before_any_lock(fakes):
    fakes.run_dir.mkdir(parents=True)
    (fakes.run_dir / "results.json").write_text(json.dumps({"complete": True}))
    fakes.lock.write_text("77 70_0 othernode 2025-01-01T00:00:00\n")
    result = fakes.array()
    assert result.returncode == 0 and "already complete" in result.stdout and fakes.ran() is None


def test_the_scripts_active_states_are_the_sweeps():
    text = (SLURM_DIR / "array.sbatch").read_text()
    states = re.search(r'^active_states=" ([A-Z_ ]+) "$', text, re.MULTILINE)
    assert states and set(states.group(1).split()) == ACTIVE_STATES
