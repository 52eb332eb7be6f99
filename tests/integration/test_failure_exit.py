"""A `timelit fit` that fails ends: the process exits non-zero within seconds of the error, which it names (issue 20).

Both runs have two loader workers. The workers ignore SIGTERM (preemption is the main process's to handle), which
is also how Python's exit handler stops daemonic children, so before the fix a failed run waited for its workers
forever: a missing shard, or a disk that filled at a checkpoint, held a cluster job until its time limit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from timelit.data.manifest import load_manifests
from timelit.data.streams import load_stream

pytestmark = pytest.mark.slow

TIMELIT = Path(sys.executable).parent / "timelit"
PROBES = Path(__file__).resolve().parent  # probes.DiskFullAtSave
TWO_WORKERS = ["--data.init_args.num_workers", "2"]
# The stream is named here, so that the tests do not depend on the quickstart config's choice.
STREAM = ["--data.init_args.task_boundaries", "equal", "--data.init_args.stream"]
# From the error to the exit: interpreter shutdown plus stopping the workers; a hang is caught by `timeout`.
EXIT_WITHIN_S = 10.0


def run_fit(args: list[str], timeout: float = 120) -> tuple[int | None, list[tuple[float, str]], float]:
    """`timelit fit ARGS` in its own process group: (exit status, None if it had to be killed; its output lines with
    the time each arrived; the time it ended), times from `time.time()` to compare with files' modification times."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", TIMELIT_LOG_LEVEL="INFO", PYTHONPATH=str(PROBES))
    process = subprocess.Popen(
        [str(TIMELIT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append((time.time(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        status: int | None = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = None
        os.killpg(process.pid, signal.SIGKILL)  # the hung run and its loader workers
        process.wait()
    ended = time.time()
    reader.join(timeout=5)
    return status, lines, ended


def first_line(lines: list[tuple[float, str]], text: str) -> float:
    """When the first line containing `text` arrived."""
    return next(t for t, line in lines if text in line)


def test_a_shard_missing_mid_run_ends_the_run_at_once(tiny_benchmark, tmp_path, quick_fit_args):
    # A dataset that the second task reads and the first does not, its shard removed at the end of the first task
    # (the fit checks every shard when it starts), so it is missed mid-run, with workers up.
    stream = load_stream("dataset_incremental", load_manifests(str(tiny_benchmark)), 2, "equal")
    dataset = sorted(set(stream.labels[1]) - set(stream.labels[0]))[0]
    data = tmp_path / "data"
    shutil.copytree(tiny_benchmark, data)
    shard = data / dataset / "train-000000.tar"

    args = quick_fit_args(data, tmp_path, tasks=2, steps=2)
    remove = ["--trainer.callbacks+=probes.RemoveAtTaskEnd", f"--trainer.callbacks.path={shard}"]
    status, lines, ended = run_fit([*args, *TWO_WORKERS, *STREAM, "dataset_incremental", *remove])

    output = "".join(line for _, line in lines)
    assert status is not None, f"the run hung after its error:\n{output[-3000:]}"
    assert status != 0
    assert f"shard {shard} is listed in" in output and "but missing" in output
    # The second task's loader starts its workers, whose first batch reads the missing shard.
    assert ended - first_line(lines, "task 1:") < EXIT_WITHIN_S, output[-3000:]


def test_a_shard_missing_at_the_start_stops_the_fit_before_training(tiny_benchmark, tmp_path, quick_fit_args):
    data = tmp_path / "data"
    shutil.copytree(tiny_benchmark, data)
    shard = data / "SHAPES" / "test-000000.tar"  # a held-out set, first read by the zero-shot evaluation
    shard.unlink()
    status, lines, _ = run_fit(quick_fit_args(data, tmp_path, tasks=2, steps=2))
    output = "".join(line for _, line in lines)
    assert status not in (None, 0), output[-3000:]
    assert "1 shard(s) that this run reads are missing or shorter than their index says:" in output
    assert f"\n  shard {shard} is missing (" in output
    assert "Sanity Checking" not in output and not (tmp_path / "run" / "experts").exists()


def test_a_full_disk_at_a_checkpoint_is_not_written_twice_and_ends_the_run(tiny_benchmark, tmp_path, quick_fit_args):
    attempts = tmp_path / "save_attempts.txt"
    args = quick_fit_args(tiny_benchmark, tmp_path, tasks=1, steps=3)
    status, lines, ended = run_fit(
        [
            *args,
            *TWO_WORKERS,
            *STREAM,
            "random",
            "--checkpoint.every_n_train_steps",
            "1",
            "--trainer.callbacks+=probes.DiskFullAtSave",
            f"--trainer.callbacks.attempts_file={attempts}",
        ]
    )

    output = "".join(line for _, line in lines)
    assert status is not None, f"the run hung after its error:\n{output[-3000:]}"
    assert status != 0
    assert "No space left on device" in output
    assert len(attempts.read_text().splitlines()) == 1, "a second save into the full disk"
    assert ended - attempts.stat().st_mtime < EXIT_WITHIN_S, output[-3000:]
