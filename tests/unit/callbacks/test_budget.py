"""ComputeBudget: steps per task derived from a GFLOP budget, tasks ended at them, spend reported and resumed.

Runs real Lightning fits of the micro CLIP on a small quickstart benchmark (written once per session).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.flop_counter import FlopCounterMode

from timelit.data.datamodule import TimeDataModule
from timelit.data.synth.benchmark import synthesize
from timelit.training.callbacks.budget import ComputeBudget
from timelit.training.callbacks.checkpoint import StreamCheckpoint
from timelit.training.callbacks.results import TaskResults
from timelit.training.flops import measure_step, steps_for_budget
from timelit.training.lightning_cli import TimeLightningCLI, run_lightning
from timelit.training.model import CLIPFineTuner
from timelit.utilities.resources import configs_dir, resolve_config

MODEL = "timelit-micro-ViT"
BATCH = 16


@pytest.fixture(scope="session")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared with tests/integration/test_budget_ddp.py through the session's base folder (synthesize is idempotent).
    root = tmp_path_factory.getbasetemp() / "budget_benchmark"
    return synthesize(root, scale=0.05, base_model=MODEL, base_steps=5, size="science")


@pytest.fixture(scope="module")
def step_gflops() -> float:
    return measure_step(MODEL, BATCH).gflops


def make_data(
    root: Path, num_tasks: int = 2, steps_per_task: int | None = None, cls: type[TimeDataModule] = TimeDataModule
) -> TimeDataModule:
    return cls(
        str(root),
        manifests=str(root),
        stream="random",
        num_tasks=num_tasks,
        batch_size=BATCH,
        pretraining_pool="SYNTH_POOL",
        steps_per_task=steps_per_task,
        eval_datasets=["DIGITS", "SHAPES"],
        eval_batch_size=64,
        num_workers=0,
    )


def make_trainer(run_dir: Path, callbacks: list, max_epochs: int, evaluate: bool = False) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        num_sanity_val_steps=-1 if evaluate else 0,
        limit_val_batches=None if evaluate else 0,
        reload_dataloaders_every_n_epochs=1,
        use_distributed_sampler=False,
        logger=TensorBoardLogger(str(run_dir), name="run", version=""),
        enable_checkpointing=any(isinstance(c, StreamCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )


def model() -> CLIPFineTuner:
    return CLIPFineTuner(MODEL, pretrained=None, lr=1e-3)


class TaskLengths(L.Callback):
    """Records, per task, the loader length Lightning planned and the batches it trained."""

    def __init__(self) -> None:
        self.planned: dict[int, int] = {}
        self.trained: dict[int, int] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        task = trainer.current_epoch
        self.planned[task] = trainer.num_training_batches
        self.trained[task] = self.trained.get(task, 0) + 1


# ---------------------------------------------------------------- the budget decides the steps


def test_budget_ends_every_task_at_its_derived_step(benchmark: Path, tmp_path: Path, step_gflops: float) -> None:
    # 2 tasks x 3 steps of budget, plus a third of a step that rounds away.
    budget = ComputeBudget(total_gflops=2 * 3.3 * step_gflops)
    lengths, data = TaskLengths(), make_data(benchmark)
    trainer = make_trainer(tmp_path, [budget, lengths, TaskResults()], max_epochs=2, evaluate=True)
    trainer.fit(model(), datamodule=data)

    assert data.steps_per_task == budget.steps_per_task == 3
    assert lengths.planned == lengths.trained == {0: 3, 1: 3}
    assert trainer.global_step == 6
    assert budget.steps == 6 and budget.task_steps == 3
    assert budget.gflops == pytest.approx(6 * step_gflops)

    results = json.loads((Path(trainer.log_dir) / "results.json").read_text())
    assert results["run"]["budget"]["steps_per_task"] == 3
    assert results["run"]["budget"]["gflops_per_step"] == pytest.approx(step_gflops)
    assert results["run"]["data"]["steps_per_task"] == 3
    spent = [(p["tasks_done"], p["steps"], p["gflops_task"], p["gflops"]) for p in results["points"]]
    assert spent == [
        (0, 0, 0.0, 0.0),
        (1, 3, pytest.approx(3 * step_gflops), pytest.approx(3 * step_gflops)),
        (2, 3, pytest.approx(3 * step_gflops), pytest.approx(6 * step_gflops)),
    ]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.log_dir)).Reload()
    cumulative = [(e.step, e.value) for e in events.Scalars("budget/gflops")]
    assert [step for step, _ in cumulative] == list(range(6))
    assert cumulative[-1][1] == pytest.approx(6 * step_gflops, rel=1e-6)
    assert [e.value for e in events.Scalars("budget/gflops_task")] == pytest.approx([3 * step_gflops] * 2, rel=1e-6)


def test_per_task_budget_and_multiplier(benchmark: Path, tmp_path: Path, step_gflops: float) -> None:
    # Each step charged twice its FLOPs (a method using twice full fine-tuning's memory): 4.1 steps of FLOPs buy 2.
    budget = ComputeBudget(gflops_per_task=4.1 * step_gflops, multiplier=2.0)
    data = make_data(benchmark, num_tasks=1)
    trainer = make_trainer(tmp_path, [budget], max_epochs=1)
    trainer.fit(model(), datamodule=data)
    assert data.steps_per_task == 2 and trainer.global_step == 2
    assert budget.gflops == pytest.approx(2 * 2 * step_gflops)


def test_floor_rounding_never_exceeds_the_budget(benchmark: Path, tmp_path: Path, step_gflops: float) -> None:
    data = make_data(benchmark, num_tasks=1)
    trainer = make_trainer(tmp_path, [ComputeBudget(gflops_per_task=2.9 * step_gflops, rounding="floor")], 1)
    trainer.fit(model(), datamodule=data)
    assert data.steps_per_task == 2 and trainer.global_step == 2


def test_without_a_budget_it_only_meters(benchmark: Path, tmp_path: Path, step_gflops: float) -> None:
    budget = ComputeBudget()
    data = make_data(benchmark, num_tasks=1, steps_per_task=2)
    trainer = make_trainer(tmp_path, [budget], max_epochs=1)
    trainer.fit(model(), datamodule=data)
    assert data.steps_per_task == 2
    assert budget.run_record(trainer)["budget"]["total_gflops"] is None
    assert budget.gflops == pytest.approx(2 * step_gflops)


def test_measured_step_is_the_modules_training_step(benchmark: Path, tmp_path: Path) -> None:
    # Count a real CPU training step of CLIPFineTuner. torch has no FLOP formula for the CPU attention kernel, so
    # attention goes uncounted there; every other op must match the meta-device measurement exactly.
    data = make_data(benchmark, num_tasks=1, steps_per_task=1)
    trainer = make_trainer(tmp_path, [], max_epochs=1)
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.fit(model(), datamodule=data)
    real = {str(op): flops / 1e9 for op, flops in counter.get_flop_counts()["Global"].items()}
    meta = measure_step(MODEL, BATCH, attention="math").by_op
    assert real == pytest.approx({op: gflops for op, gflops in meta.items() if op != "aten.bmm"}, rel=1e-12)


# ---------------------------------------------------------------- bad budgets fail before training


def test_budget_smaller_than_one_step_is_refused(benchmark: Path, tmp_path: Path, step_gflops: float) -> None:
    trainer = make_trainer(tmp_path, [ComputeBudget(total_gflops=step_gflops)], max_epochs=2)
    with pytest.raises(ValueError, match=r"over data.num_tasks=2 tasks gives .* less than one training step") as info:
        trainer.fit(model(), datamodule=make_data(benchmark))
    assert MODEL in str(info.value) and f"global batch {BATCH}" in str(info.value)
    assert trainer.global_step == 0


def test_conflicting_steps_per_task_is_refused(benchmark: Path, tmp_path: Path, step_gflops: float) -> None:
    trainer = make_trainer(tmp_path, [ComputeBudget(gflops_per_task=3 * step_gflops)], max_epochs=1)
    with pytest.raises(ValueError, match=r"data.steps_per_task=5 conflicts with the compute budget, which gives 3"):
        trainer.fit(model(), datamodule=make_data(benchmark, num_tasks=1, steps_per_task=5))
    assert trainer.global_step == 0


def test_matching_steps_per_task_is_accepted(benchmark: Path, tmp_path: Path, step_gflops: float) -> None:
    trainer = make_trainer(tmp_path, [ComputeBudget(gflops_per_task=3 * step_gflops)], max_epochs=1)
    trainer.fit(model(), datamodule=make_data(benchmark, num_tasks=1, steps_per_task=3))
    assert trainer.global_step == 3


class OverlongData(TimeDataModule):
    """A data module whose loaders ignore the budget and are two batches longer."""

    def task_batches(self, task: int) -> Any:
        batches = super().task_batches(task)
        batches.steps += 2
        return batches


def test_a_loader_longer_than_the_budget_is_refused(benchmark: Path, tmp_path: Path, step_gflops: float) -> None:
    data = make_data(benchmark, num_tasks=1, cls=OverlongData)
    trainer = make_trainer(tmp_path, [ComputeBudget(gflops_per_task=3 * step_gflops)], max_epochs=1)
    with pytest.raises(RuntimeError, match=r"task 0: the training loader has 5 batches .* allows 3 steps"):
        trainer.fit(model(), datamodule=data)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_gflops": 1e9, "gflops_per_task": 1e8}, "both set; choose one"),
        ({"total_gflops": 0.0}, "budget.total_gflops must be a positive"),
        ({"gflops_per_task": -5.0}, "budget.gflops_per_task must be a positive"),
        ({"total_gflops": 1e9, "multiplier": 0.0}, "budget.multiplier must be positive"),
        ({"attention": "flash"}, "budget.attention must be 'fused' or 'math'"),
    ],
)
def test_invalid_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ComputeBudget(**kwargs)


# ---------------------------------------------------------------- resume


class Killed(Exception):
    pass


class Crash(L.Callback):
    """Dies after `at_step` steps, before that step's checkpoint is written (like a SIGKILL mid-task)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            raise Killed


def _points(run_dir: Path) -> list[dict[str, Any]]:
    return json.loads((run_dir / "run" / "results.json").read_text())["points"]


def _stream_run(root: Path, run_dir: Path, gflops: float, crash_at: int | None = None) -> tuple[ComputeBudget, Any]:
    budget = ComputeBudget(total_gflops=gflops)
    callbacks = [budget, TaskResults(), StreamCheckpoint(every_n_train_steps=1, save_on_exception=False)]
    callbacks += [Crash(crash_at)] if crash_at is not None else []
    trainer = make_trainer(run_dir, callbacks, max_epochs=2, evaluate=True)
    last = run_dir / "run" / "checkpoints" / "last.ckpt"
    torch.manual_seed(0)
    try:
        trainer.fit(model(), datamodule=make_data(root), ckpt_path=str(last) if last.exists() else None)
    except Killed:
        assert crash_at is not None
    return budget, trainer


@pytest.mark.slow
def test_resume_continues_the_counters_exactly(benchmark: Path, tmp_path: Path, step_gflops: float) -> None:
    total = 2 * 4 * step_gflops  # 4 steps per task
    whole, _ = _stream_run(benchmark, tmp_path / "whole", total)

    crashed, trainer = _stream_run(benchmark, tmp_path / "resumed", total, crash_at=7)
    assert trainer.global_step == 7 and (crashed.task, crashed.task_steps) == (1, 3)
    resumed, trainer = _stream_run(benchmark, tmp_path / "resumed", total)  # from last.ckpt: task 1 after 2 steps

    assert trainer.global_step == 8
    assert resumed.state_dict() == whole.state_dict()
    spent = [
        [(p["tasks_done"], p["steps"], p["gflops_task"], p["gflops"]) for p in _points(tmp_path / run)]
        for run in ("whole", "resumed")
    ]
    assert spent[0] == spent[1]
    four = 4 * step_gflops
    assert [s[1:] for s in spent[0]] == [(0, 0.0, 0.0), (4, four, four), (4, four, 2 * four)]


def test_resume_under_a_different_budget_is_refused(benchmark: Path, tmp_path: Path, step_gflops: float) -> None:
    _stream_run(benchmark, tmp_path, 2 * 4 * step_gflops, crash_at=2)
    with pytest.raises(ValueError, match=r"checkpoint was trained with 4 steps per task, .* gives 6"):
        _stream_run(benchmark, tmp_path, 2 * 6 * step_gflops)


# ---------------------------------------------------------------- the `budget:` config section


def run_cli(args: list[str], run: bool = True) -> TimeLightningCLI:
    """timelit's own CLI, which always has the `budget:` section; `run=False` only parses and instantiates."""
    return run_lightning(args, run=run)


def budget_of(cli: TimeLightningCLI) -> ComputeBudget:
    (budget,) = [c for c in cli.trainer.callbacks if isinstance(c, ComputeBudget)]
    return budget


@pytest.fixture
def micro_config(benchmark: Path, tmp_path: Path) -> Path:
    path = tmp_path / "micro.yaml"
    path.write_text(
        f"""
trainer:
  accelerator: cpu
  devices: 1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp_path}, name: cli, version: ""}}
model:
  class_path: timelit.training.model.CLIPFineTuner
  init_args: {{model_name: {MODEL}, pretrained: null}}
data:
  class_path: timelit.data.datamodule.TimeDataModule
  init_args:
    data_root: {benchmark}
    manifests: {benchmark}
    stream: random
    num_tasks: 1
    batch_size: {BATCH}
    pretraining_pool: SYNTH_POOL
    eval_datasets: [DIGITS]
    num_workers: 0
checkpoint:
  dirpath: {tmp_path / "checkpoints"}
"""
    )
    return path


def test_budget_section_drives_a_cli_fit(micro_config: Path, step_gflops: float) -> None:
    cli = run_cli(["fit", "--config", str(micro_config), "--budget.gflops_per_task", str(2.2 * step_gflops)])
    assert budget_of(cli).active and cli.datamodule.steps_per_task == 2
    assert cli.trainer.global_step == 2


def test_without_a_budget_section_the_callback_is_inactive(micro_config: Path) -> None:
    cli = run_cli(["--config", str(micro_config), "--data.init_args.steps_per_task", "2"], run=False)
    budget = budget_of(cli)
    assert not budget.active and (budget.total_gflops, budget.gflops_per_task, budget.multiplier) == (None, None, 1.0)


REFERENCE_STEPS = {20: 1420, 50: 568, 100: 284, 200: 142}  # FoMo-in-Flux README table, full fine-tuning


@pytest.fixture(scope="module")
def reference_step_gflops() -> float:
    return measure_step("ViT-B-16", 512).gflops


@pytest.mark.parametrize("fragment", sorted(p.name for p in (configs_dir() / "budget").glob("*.yaml")))
def test_shipped_budget_fragments_compose_and_buy_what_they_say(fragment: str, reference_step_gflops: float) -> None:
    quickstart = fragment == "quickstart.yaml"
    args = ["--config", str(resolve_config("quickstart.yaml"))] if quickstart else []
    args += ["--config", str(resolve_config(f"budget/{fragment}"))]
    if not quickstart:  # the FoMo-in-Flux fragments, with the data module's defaults (batch 512, 20 tasks)
        args += ["--data.class_path", "timelit.data.datamodule.TimeDataModule", "--data.init_args.data_root", "/x"]
        args += [
            "--data.init_args.pretraining_pool",
            "LAION",
            "--model.class_path",
            "timelit.training.model.CLIPFineTuner",
        ]
        args += ["--model.init_args.model_name", MODEL, "--model.init_args.pretrained", "null"]  # ViT-B-16 is costed
    cli = run_cli(args, run=False)
    budget, data = budget_of(cli), cli.datamodule
    expected = yaml.safe_load(resolve_config(f"budget/{fragment}").read_text())
    assert budget.total_gflops == pytest.approx(float(expected["budget"]["total_gflops"]))
    assert cli.trainer.max_epochs == data.num_tasks
    cost = measure_step(cli.model.hparams.model_name, data.batch_size).gflops if quickstart else reference_step_gflops
    steps = steps_for_budget(budget.budget_per_task(data.num_tasks), cost)
    if quickstart:
        assert steps == 100 and data.steps_per_task is None  # the quickstart's own budget buys its 100 steps
    elif fragment.startswith("tasks_"):
        assert data.num_tasks == int(fragment[6:-5]) and steps == REFERENCE_STEPS[data.num_tasks]
    else:
        scale = budget.total_gflops / 1.8e9
        assert data.num_tasks == 20 and data.batch_size == 512
        assert abs(steps - scale * REFERENCE_STEPS[20]) <= max(1.0, scale)
