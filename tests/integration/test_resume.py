"""A run killed anywhere resumes to the same result: weights, merged files and results, bitwise on CPU.

In the style of Lightning's `test_ema_resume`: crash at several points (mid-task, on a task's last step, during an
evaluation), resume from `last.ckpt`, compare with an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from timelit.training.callbacks.budget import ComputeBudget
from timelit.training.callbacks.checkpoint import StreamCheckpoint
from timelit.training.callbacks.ema import StepEMA
from timelit.training.callbacks.results import TaskResults
from timelit.training.callbacks.time_merge import TimeMerge

TASKS, STEPS = 3, 4


class Crash(Exception):
    pass


class CrashAt(Callback):
    """Raises after optimizer step `step`, or during the evaluation after task `during_eval_of`."""

    def __init__(self, step: int | None = None, during_eval_of: int | None = None):
        self.step, self.during_eval_of = step, during_eval_of

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"killed after step {self.step}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.current_epoch == self.during_eval_of and dataloader_idx == 2:
            raise Crash(f"killed while evaluating task {self.during_eval_of}")


def fit(
    fit_stream,
    benchmark: Path,
    run_dir: Path,
    crash: Callback | None = None,
    step_ema: bool = False,
    technique: str = "interpolation",
    micro_batches: int = 1,
    meter: bool = False,
    images: str = "host",
) -> None:
    merge = TimeMerge(init="ema", deploy="ema", technique=technique)
    callbacks = [merge, TaskResults(), StreamCheckpoint(every_n_train_steps=2)]
    if step_ema:
        callbacks.insert(0, StepEMA(decay=0.9))
    if meter:
        callbacks.insert(0, ComputeBudget())
    callbacks = [*callbacks, crash] if crash else callbacks
    data = {"images": images} if images != "host" else None
    fit_stream(benchmark, run_dir, callbacks, tasks=TASKS, steps=STEPS, data_options=data, micro_batches=micro_batches)


def outcome(run: Path) -> dict:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    results = json.loads((run / "results.json").read_text())
    return {
        "live": checkpoint["state_dict"],
        "optimizer": checkpoint["optimizer_states"][0]["state"],
        "final": load_file(str(run / "final_model.safetensors")),
        "experts": [load_file(str(run / "experts" / f"expert_{t:04d}.safetensors")) for t in range(TASKS)],
        "points": [
            {k: p[k] for k in ("tasks_done", "global_step", "A_KA", "A_ZS", "GM", "datasets")}
            for p in results["points"]
        ],
        "complete": results["complete"],
    }


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tiny_benchmark, tmp_path_factory, stream_fit) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    fit(stream_fit, tiny_benchmark, run_dir)
    return outcome(run_dir / "run")


@pytest.mark.slow
@pytest.mark.parametrize(
    "crash",
    [
        pytest.param({"step": 2}, id="mid-task-0"),
        pytest.param({"step": 4}, id="last-step-of-task-0"),
        pytest.param({"step": 7}, id="mid-task-1-odd-step"),
        pytest.param({"during_eval_of": 1}, id="during-evaluation-after-task-1"),
        pytest.param({"step": 5}, id="first-step-of-task-1"),
        # From task 2 on, a boundary removes merged files that the newest last.ckpt (taken before it) still lists.
        pytest.param({"step": 12}, id="last-step-of-task-2"),
        pytest.param({"during_eval_of": 2}, id="during-evaluation-after-task-2"),
    ],
)
def test_killed_and_resumed_run_equals_uninterrupted(tiny_benchmark, tmp_path, stream_fit, uninterrupted, crash):
    with pytest.raises(Crash):
        fit(stream_fit, tiny_benchmark, tmp_path, CrashAt(**crash))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    fit(stream_fit, tiny_benchmark, tmp_path)
    resumed = outcome(tmp_path / "run")
    assert resumed["complete"] and uninterrupted["complete"]
    assert identical(resumed["live"], uninterrupted["live"])
    assert identical(resumed["final"], uninterrupted["final"])
    for mine, theirs in zip(resumed["experts"], uninterrupted["experts"]):
        assert identical(mine, theirs)
    assert all(
        torch.equal(resumed["optimizer"][i][k], uninterrupted["optimizer"][i][k])
        for i in uninterrupted["optimizer"]
        for k in uninterrupted["optimizer"][i]
    )
    assert resumed["points"] == uninterrupted["points"]


@pytest.mark.slow
def test_step_ema_state_survives_a_kill(tiny_benchmark, tmp_path, stream_fit):
    fit(stream_fit, tiny_benchmark, tmp_path / "a", step_ema=True)
    with pytest.raises(Crash):
        fit(stream_fit, tiny_benchmark, tmp_path / "b", CrashAt(step=7), step_ema=True)
    fit(stream_fit, tiny_benchmark, tmp_path / "b", step_ema=True)
    a, b = outcome(tmp_path / "a" / "run"), outcome(tmp_path / "b" / "run")
    assert all(identical(x, y) for x, y in zip(a["experts"], b["experts"]))
    assert identical(a["final"], b["final"]) and a["points"] == b["points"]


@pytest.fixture(scope="module")
def uninterrupted_opcm(tiny_benchmark, tmp_path_factory, stream_fit) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted_opcm")
    fit(stream_fit, tiny_benchmark, run_dir, technique="opcm")
    return {**outcome(run_dir / "run"), "ema": load_file(str(run_dir / "run" / "experts" / "ema_0002.safetensors"))}


@pytest.mark.slow
@pytest.mark.parametrize("step", [6, 8, 12], ids=["mid-task-1", "last-step-of-task-1", "last-step-of-task-2"])
def test_opcm_state_survives_a_kill(tiny_benchmark, tmp_path, stream_fit, uninterrupted_opcm, step):
    """OPCM carries its scale, norm sum and count in TimeMerge's checkpoint state: a run killed in a task, or on its
    last step (after the boundary wrote the merged file, before a checkpoint recorded the new state), folds the
    next experts exactly as an uninterrupted run."""
    with pytest.raises(Crash):
        fit(stream_fit, tiny_benchmark, tmp_path, CrashAt(step=step), technique="opcm")
    fit(stream_fit, tiny_benchmark, tmp_path, technique="opcm")
    resumed, uninterrupted = outcome(tmp_path / "run"), uninterrupted_opcm
    assert resumed["complete"] and all(identical(x, y) for x, y in zip(resumed["experts"], uninterrupted["experts"]))
    assert identical(resumed["final"], uninterrupted["final"]) and resumed["points"] == uninterrupted["points"]
    assert identical(load_file(str(tmp_path / "run" / "experts" / "ema_0002.safetensors")), uninterrupted["ema"])


def spent(run: Path) -> list[tuple]:
    """Per results point: tasks done, global step, steps of the task, GFLOPs of the task and in total."""
    points = json.loads((run / "results.json").read_text())["points"]
    return [tuple(p[k] for k in ("tasks_done", "global_step", "steps", "gflops_task", "gflops")) for p in points]


@pytest.mark.slow
def test_micro_batches_keep_the_steps_and_gflops_and_resume_exactly(tiny_benchmark, tmp_path, stream_fit):
    """With model.micro_batches=4 (batch 16 in slices of 4) a task is still STEPS loader batches and optimizer steps
    and charges the same GFLOPs as the unsplit batch (StepEMA and TimeMerge on), and a run killed mid-task resumes
    bitwise equal to an uninterrupted one with the same micro-batches."""
    options = {"step_ema": True, "meter": True}
    fit(stream_fit, tiny_benchmark, tmp_path / "whole", **options)
    fit(stream_fit, tiny_benchmark, tmp_path / "micro", micro_batches=4, **options)
    with pytest.raises(Crash):
        fit(stream_fit, tiny_benchmark, tmp_path / "killed", CrashAt(step=7), micro_batches=4, **options)
    fit(stream_fit, tiny_benchmark, tmp_path / "killed", micro_batches=4, **options)
    whole, micro, resumed = (tmp_path / name / "run" for name in ("whole", "micro", "killed"))
    assert spent(micro) == spent(whole) == spent(resumed)
    assert [p[2] for p in spent(micro)[1:]] == [STEPS] * TASKS
    a, b = outcome(micro), outcome(resumed)
    assert a["complete"] and b["complete"]
    assert identical(a["live"], b["live"]) and identical(a["final"], b["final"])
    assert all(identical(x, y) for x, y in zip(a["experts"], b["experts"]))
    assert a["points"] == b["points"]
    # The same training as the unsplit batch, to float rounding amplified by 12 AdamW steps.
    unsplit = outcome(whole)["live"]
    assert max((a["live"][k] - unsplit[k]).abs().max().item() for k in unsplit) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("step", [7, 8], ids=["mid-task-1-odd-step", "last-step-of-task-1"])
def test_device_images_resume_exactly(tiny_benchmark, tmp_path, stream_fit, uninterrupted, step):
    """With data.images=device (uint8 crops resampled in on_after_batch_transfer) a run killed mid-task or on a
    task's last step resumes bitwise equal to an uninterrupted device run; its results are close to, not equal to,
    the host pipeline's (pixels differ by rounding)."""
    fit(stream_fit, tiny_benchmark, tmp_path / "whole", images="device")
    with pytest.raises(Crash):
        fit(stream_fit, tiny_benchmark, tmp_path / "killed", CrashAt(step=step), images="device")
    fit(stream_fit, tiny_benchmark, tmp_path / "killed", images="device")
    a, b = outcome(tmp_path / "whole" / "run"), outcome(tmp_path / "killed" / "run")
    assert a["complete"] and b["complete"]
    assert identical(a["live"], b["live"]) and identical(a["final"], b["final"])
    assert all(identical(x, y) for x, y in zip(a["experts"], b["experts"]))
    assert a["points"] == b["points"]
    host = uninterrupted["live"]
    assert max((a["live"][k] - host[k]).abs().max().item() for k in host) < 5e-2
