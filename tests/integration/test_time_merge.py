"""TimeMerge on a 3-task quickstart: what each task started from and what was deployed, checked against the stored
experts with merges computed here independently of timelit.merging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from timelit.callbacks.checkpoint import StreamCheckpoint
from timelit.callbacks.results import TaskResults
from timelit.callbacks.time_merge import TimeMerge

TASKS = 3


class Probe(Callback):
    """Copies of the weights at the first step of every task and during every evaluation after a task."""

    def __init__(self) -> None:
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.evaluated: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.start[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.evaluated[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def run_protocol(stream_fit, benchmark: Path, run_dir: Path, **protocol) -> tuple[Probe, Path]:
    probe = Probe()
    callbacks = [TimeMerge(**protocol), TaskResults(), StreamCheckpoint(every_n_train_steps=100), probe]
    stream_fit(benchmark, run_dir, callbacks, tasks=TASKS, steps=3)
    return probe, run_dir / "run"


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)


def combine(weights: list[float], models: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(w * m[k].float() for w, m in zip(weights, models)) for k in models[0]}


def expectations(run: Path) -> dict[str, list[dict[str, torch.Tensor]]]:
    """What each quantity is after each task, from the files alone (interpolation, w = 0.5, uniform `all`)."""
    base = load_file(str(run / "experts" / "base.safetensors"))
    experts = [load_file(str(run / "experts" / f"expert_{t:04d}.safetensors")) for t in range(TASKS)]
    ema, emas = base, []
    for expert in experts:
        ema = combine([0.5, 0.5], [ema, expert])
        emas.append(ema)
    alls = [combine([1 / (t + 1)] * (t + 1), experts[: t + 1]) for t in range(TASKS)]
    return {
        "zs": [base] * TASKS,
        "ft": experts,
        "ema": emas,
        "all": alls,
        "ft_zs": [combine([0.5, 0.5], [base, e]) for e in experts],
        "base": [base],
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("init", "deploy"),
    [("zs", "all"), ("ft", "ema"), ("ema", "ft"), ("all", "ft_zs"), ("ft_zs", "ema"), ("ema", "ema")],
)
def test_each_task_starts_and_deploys_what_the_protocol_says(tiny_benchmark, tmp_path, stream_fit, init, deploy):
    probe, run = run_protocol(stream_fit, tiny_benchmark, tmp_path, init=init, deploy=deploy)
    expected = expectations(run)
    assert close(probe.start[0], expected["base"][0])  # every protocol starts at θ0
    for task in range(1, TASKS):
        assert close(probe.start[task], expected[init][task - 1]), f"init of task {task}"
    for task in range(TASKS):
        assert close(probe.evaluated[task], expected[deploy][task]), f"deployed after task {task}"
        assert not close(probe.evaluated[task], expected["base"][0])  # training changed something
    final = load_file(str(run / "final_model.safetensors"))
    assert close(final, expected[deploy][TASKS - 1])


@pytest.mark.slow
def test_other_techniques_reach_the_merge_engine(tiny_benchmark, tmp_path, stream_fit):
    """TIES over all experts (the paper's all/all TIES row) and TA-EMA write what timelit.merging computes."""
    from timelit.merging import merge

    probe, run = run_protocol(
        stream_fit, tiny_benchmark, tmp_path, init="all", deploy="all", technique="ties", hparams={"k": 0.3}
    )
    base = str(run / "experts" / "base.safetensors")
    experts = [str(run / "experts" / f"expert_{t:04d}.safetensors") for t in range(TASKS)]
    for task in range(TASKS):
        reference = merge(base, experts[: task + 1], "ties", k=0.3) if task else load_file(experts[0])
        assert close(probe.evaluated[task], reference)
