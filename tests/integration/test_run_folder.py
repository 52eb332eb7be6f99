"""A run folder survives crashes and misuse (issue 20, items 2-4), with real `timelit fit` runs:

- kill -9 in the middle of writing each kind of file, then the same command again: the resumed run removes the
  leftover temporary file, says how much it freed, and ends with the same bits as a run that was never killed;
- a disk too full for a task boundary's files stops the run there, before it writes any of them, with last.ckpt
  intact; once there is space again the same command resumes to the same bits;
- a second fit into a folder that a running fit holds stops at once, naming the holder, having written nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import timelit.utilities.disk_space
from timelit.commands.cli import run_lightning
from timelit.utilities.disk_space import DiskSpaceError
from timelit.utilities.folder_lock import RunFolderBusy

pytestmark = pytest.mark.slow

TIMELIT = Path(sys.executable).parent / "timelit"
PROBES = Path(__file__).resolve().parent  # probes.KillMidWrite, probes.PauseAtStep
TASKS, STEPS = 2, 2
# A last.ckpt after every step, so that a kill resumes from within the stream rather than from its start.
EVERY_STEP = ["--checkpoint.every_n_train_steps", "1"]


def start_fit(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(PROBES), OMP_NUM_THREADS="1")
    return subprocess.Popen([str(TIMELIT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def weights_files(run: Path) -> dict[str, bytes]:
    """The bytes of every weights file a run leaves: experts, merged weights, the final model."""
    files = [*sorted((run / "experts").glob("*.safetensors")), run / "final_model.safetensors"]
    return {path.name: path.read_bytes() for path in files}


def temporaries(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*.tmp"))


def written(run: Path) -> dict[Path, int]:
    """Every file and its modification time, but TensorBoard's event files (its writer thread flushes them)."""
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if "tfevents" not in p.name}


def figures(run: Path) -> list[dict]:
    results = json.loads((run / "results.json").read_text())
    assert results["complete"]
    return [{k: p[k] for k in ("tasks_done", "global_step", "A_KA", "A_ZS", "GM")} for p in results["points"]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The killed fits run as subprocesses with OMP_NUM_THREADS=1 (start_fit); the reference and the in-process
    resumes must reduce in the same order, or bitwise comparisons fail whenever pytest itself runs with more threads
    (the default on a 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tiny_benchmark, tmp_path_factory, quick_fit_args) -> Path:
    """The same command, never interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_lightning(quick_fit_args(tiny_benchmark, run_dir, *EVERY_STEP, tasks=TASKS, steps=STEPS))
    return run_dir / "run"


@pytest.mark.parametrize(
    ("name", "nth"),
    [
        ("config.yaml", 1),  # at set-up
        ("results.json", 2),  # after task 0's evaluation
        ("expert_0001.safetensors", 1),  # task 1's boundary
        ("ema_0001.safetensors", 1),  # its merged weights
        ("last.ckpt", 2),  # task 0's task-end checkpoint (the first is step 1's, which the resume starts from)
        ("final_model.safetensors", 1),  # after the last task
    ],
)
def test_a_kill_mid_write_of_any_file_resumes_to_the_same_bits_and_leaves_no_temporary_file(
    tiny_benchmark, tmp_path, quick_fit_args, uninterrupted, caplog, name, nth
):
    args = quick_fit_args(tiny_benchmark, tmp_path, *EVERY_STEP, tasks=TASKS, steps=STEPS)
    killed = start_fit([*args, "--trainer.callbacks+=probes.KillMidWrite", f"--trainer.callbacks.name={name}",
                        f"--trainer.callbacks.nth={nth}"])  # fmt: skip
    output, _ = killed.communicate(timeout=120)
    assert killed.returncode == -9, output[-3000:]
    run = tmp_path / "run"
    (leftover,) = [Path(p) for p in temporaries(run)]
    assert leftover.name.startswith(f".{name}.") and leftover.name.endswith(f".{killed.pid}.tmp")
    size = (run / leftover).stat().st_size

    with caplog.at_level(logging.INFO, logger="timelit"):
        run_lightning(args)  # the same command: resumes from last.ckpt when there is one

    assert temporaries(run) == []
    assert "removed 1 temporary file(s) of writes that were killed midway, freeing " in caplog.text
    assert timelit.utilities.disk_space.format_bytes(size) in caplog.text
    assert f"pid {killed.pid}" in caplog.text  # the dead fit's lock, taken over
    assert weights_files(run) == weights_files(uninterrupted)
    assert figures(run) == figures(uninterrupted)


def test_a_disk_too_full_for_a_boundary_stops_the_run_there_and_resumes_once_freed(
    tiny_benchmark, tmp_path, quick_fit_args, uninterrupted, monkeypatch
):
    real_free = timelit.utilities.disk_space.free_bytes
    boundaries = []

    def free_bytes(path):  # the second task boundary finds 900 bytes free
        boundaries.append(path)
        return real_free(path) if len(boundaries) == 1 else 900

    monkeypatch.setattr(timelit.utilities.disk_space, "free_bytes", free_bytes)
    args = quick_fit_args(tiny_benchmark, tmp_path, *EVERY_STEP, tasks=TASKS, steps=STEPS)
    with pytest.raises(DiskSpaceError) as caught:
        run_lightning(args)
    message = str(caught.value)
    run = tmp_path / "run"
    assert message.startswith(
        "not enough disk space for the files of task 1's boundary (expert_0001.safetensors, ema_0001.safetensors, "
        "final_model.safetensors, last.ckpt): "
    )
    assert f"{run / 'experts'}" in message and "900 B free" in message and "\n" not in message
    assert not (run / "experts" / "expert_0001.safetensors").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3  # mid task 1
    assert temporaries(run) == []

    monkeypatch.setattr(timelit.utilities.disk_space, "free_bytes", real_free)  # space freed
    run_lightning(args)
    assert weights_files(run) == weights_files(uninterrupted)
    assert figures(run) == figures(uninterrupted)


def test_a_second_fit_into_a_running_fits_folder_stops_at_once_naming_it(tiny_benchmark, tmp_path, quick_fit_args):
    args = quick_fit_args(tiny_benchmark, tmp_path, tasks=1, steps=3)
    gate = tmp_path / "gate"
    first = start_fit([*args, "--trainer.callbacks+=probes.PauseAtStep", f"--trainer.callbacks.marker_dir={gate}"])
    try:
        deadline = time.monotonic() + 120
        while not (gate / "paused").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (gate / "paused").exists(), first.communicate()[0][-3000:]
        run = tmp_path / "run"
        before = written(run)

        with pytest.raises(RunFolderBusy) as caught:
            run_lightning(args)

        assert f"{run} is in use by another timelit fit (host " in str(caught.value)
        assert f"pid {first.pid} (timelit fit)" in str(caught.value)
        assert written(run) == before  # nothing written, nothing removed
    finally:
        gate.mkdir(exist_ok=True)
        (gate / "go").touch()
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 0, output[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["complete"]
