"""Evaluation under DDP, and what a quickstart run leaves in TensorBoard and results.json.

    python -m pytest tests/integration/test_eval_ddp.py -q

Both tests run on a tiny generated benchmark (the quickstart's datasets at 5% scale, a 1-layer 16 px CLIP).
The DDP test validates with two CPU processes (gloo, `ddp_spawn`) and with one, and compares what every rank
computed; the TensorBoard test runs `timelit fit` in-process and reads the event files back with tensorboard's own
reader.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from timelit.data.datamodule import TimeDataModule
from timelit.training.evaluation.subsets import SubsetRule
from timelit.training.model import CLIPFineTuner

REPO = Path(__file__).resolve().parents[2]
MODEL = "timelit-micro-ViT"
# Small enough that subsets are smaller than the test splits (the default floor of 300 would take them whole).
SUBSET = SubsetRule(fraction=0.5, minimum=5, per_class=1, seed=3)


@pytest.fixture(scope="module")
def benchmark(tiny_benchmark: Path) -> Path:
    return tiny_benchmark


class RecordEvaluation(Callback):
    """Writes what the module computed in each rank's process to `<out>/rank<r>of<world>.json`."""

    def __init__(self, out: str):
        self.out = out

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.out) / f"rank{trainer.global_rank}of{trainer.world_size}.json"
        path.write_text(json.dumps(pl_module.last_evaluation))


def data_module(benchmark: Path) -> TimeDataModule:
    return TimeDataModule(
        data_root=str(benchmark),
        manifests=str(benchmark),
        stream="random",
        num_tasks=2,
        batch_size=8,
        pretraining_pool="SYNTH_POOL",
        steps_per_task=1,
        eval_batch_size=3,  # ranks end on partial batches
        eval_subset=SUBSET,
        num_workers=0,
    )


def validate(benchmark: Path, out: Path, devices: int) -> None:
    out.mkdir()
    model = CLIPFineTuner(model_name=MODEL, pretrained=str(benchmark / "base_model.safetensors"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        callbacks=[RecordEvaluation(str(out))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.validate(model, datamodule=data_module(benchmark))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_same_figures(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for name, entry in expected.items():
        for scope in ("subset", "full"):
            figures = got[name][scope]
            assert figures["n"] == entry[scope]["n"], (name, scope)
            assert figures == pytest.approx(entry[scope], abs=1e-4), (name, scope)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_agree_with_each_other_and_with_one_process(benchmark, tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.syspath_prepend(str(REPO))  # spawned ranks import this module to unpickle RecordEvaluation
    validate(benchmark, tmp_path / "ddp", devices=2)
    validate(benchmark, tmp_path / "single", devices=1)
    rank0, rank1 = (json.loads((tmp_path / "ddp" / f"rank{r}of2.json").read_text()) for r in (0, 1))
    single = json.loads((tmp_path / "single" / "rank0of1.json").read_text())

    assert rank0 == rank1  # the very same figures on every rank
    assert rank0["scope"] == single["scope"] == "full"
    assert_same_figures(rank0["datasets"], single["datasets"])

    # Every sample counted once: n is the subset or split size, odd sizes included (one rank gets one more).
    data = data_module(benchmark)
    data.setup("validate")
    sizes = {spec.name: (len(spec.subset), spec.num_samples) for spec in data.eval_specs}
    assert any(n % 2 for pair in sizes.values() for n in pair), "the fixture should hold an odd-sized set"
    assert any(subset < full for subset, full in sizes.values()), "the fixture should hold a proper subset"
    counted = {name: (e["subset"]["n"], e["full"]["n"]) for name, e in rank0["datasets"].items()}
    assert counted == sizes
    assert {e["task"] for e in rank0["datasets"].values()} == {"classification", "retrieval"}


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def quickstart_run(benchmark: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`timelit fit --config quickstart.yaml` on the tiny benchmark: 2 tasks of 2 steps; returns the run directory."""
    from timelit.commands.cli import run_lightning

    runs = tmp_path_factory.mktemp("quickstart") / "runs"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(runs.parent)
        # fmt: off
        run_lightning([
            "fit", "--config", "quickstart.yaml",
            "--model.init_args.model_name", MODEL,
            "--model.init_args.pretrained", str(benchmark / "base_model.safetensors"),
            "--data.init_args.data_root", str(benchmark), "--data.init_args.manifests", str(benchmark),
            "--data.init_args.num_tasks", "2", "--data.init_args.steps_per_task", "2",
            "--data.init_args.batch_size", "16", "--data.init_args.eval_batch_size", "64",
            "--data.init_args.num_workers", "0",
            "--budget.total_gflops", "null",  # steps_per_task is given instead of the config's budget
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(runs), "--trainer.default_root_dir", str(runs),
        ])
        # fmt: on
    return runs / "quickstart"


@pytest.mark.slow
def test_quickstart_run_logs_summaries_for_every_task(quickstart_run):
    results = json.loads((quickstart_run / "results.json").read_text())
    scalars = read_scalars(quickstart_run)

    assert results["complete"] is True
    points = {p["tasks_done"]: p for p in results["points"]}
    assert sorted(points) == [0, 1, 2]
    for key in ("A_KA", "A_ZS", "GM"):
        logged = scalars[f"summary/{key}"]
        assert sorted(logged) == [0, 1, 2]  # x = tasks trained, 0 = the zero-shot model
        for step, value in logged.items():
            assert value == pytest.approx(points[step][key], rel=1e-6)
    for name, figures in points[0]["datasets"].items():
        metric = "top1" if figures["task"] == "classification" else "R@5"
        expected = {step: points[step]["datasets"][name][metric] for step in points}
        assert scalars[f"eval/{name}/{metric}"] == pytest.approx(expected, rel=1e-6)
    assert {p["datasets"][n]["role"] for p in points.values() for n in p["datasets"]} == {"adapt", "eval"}
    # Full splits before and after the stream, as results.json records them.
    for where, step in (("start", 0), ("end", 2)):
        assert results["full"][where]["tasks_done"] == step
        assert results["full"][where]["GM"] is not None  # NaN is written as null
        assert scalars["full/GM"][step] == pytest.approx(results["full"][where]["GM"], rel=1e-6)
    # Training loss and learning rate per step.
    assert len(scalars["train/loss"]) == 4 and len(scalars["train/lr"]) == 4


@pytest.mark.slow
def test_only_the_start_and_the_end_use_full_splits(quickstart_run):
    assert sorted(read_scalars(quickstart_run)["full/GM"]) == [0, 2]
