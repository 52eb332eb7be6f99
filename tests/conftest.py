"""Shared fixtures: a tiny procedural benchmark and the arguments of a quick `timelit fit`.

Multi-process tests use the gloo backend on loopback; without these two variables its start-up takes a minute.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("TIMELIT_LOG_LEVEL", "WARNING")
# One torch thread per process (unless the caller sets another number): the suite's models are micro-sized, where a
# second thread buys nothing, and its multi-process tests (two DDP ranks, fits beside their launcher) would otherwise
# put four spinning threads on the two cores, which makes every step several times slower (a TimeMerge test: 2.7 s
# with one thread, 19.9 s with two while one other process ran). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file

MICRO = "timelit-micro-ViT"


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The science-size benchmark (12 adaptation datasets, a retrieval one among them) at 5% size with a micro base
    model (a few seconds); read-only for tests."""
    from timelit.data.synth.benchmark import synthesize

    root = tmp_path_factory.mktemp("benchmark") / "quickstart"
    synthesize(root, scale=0.05, base_model=MICRO, base_steps=5, size="science")
    return root


def fit_args(benchmark: Path, run_dir: Path, *extra: str, tasks: int = 2, steps: int = 4) -> list[str]:
    """`timelit fit` arguments for a seconds-long run of the quickstart config on `benchmark`."""
    return [
        "fit",
        "--config",
        "quickstart.yaml",
        "--model.init_args.model_name",
        MICRO,
        "--model.init_args.pretrained",
        str(benchmark / "base_model.safetensors"),
        "--data.init_args.data_root",
        str(benchmark),
        "--data.init_args.manifests",
        str(benchmark),
        "--data.init_args.num_tasks",
        str(tasks),
        "--data.init_args.steps_per_task",
        str(steps),
        "--data.init_args.batch_size",
        "16",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.eval_batch_size",
        "64",
        "--budget.total_gflops",
        "null",
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        "--trainer.logger.init_args.name",
        "run",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


@pytest.fixture(scope="session")
def quick_fit_args():
    """`fit_args` for tests (test modules cannot import conftest under pytest's importlib mode)."""
    return fit_args


def fit_stream(
    benchmark: Path,
    run_dir: Path,
    callbacks: list,
    tasks: int,
    steps: int,
    ckpt_path: str | None = "last",
    data_options: dict | None = None,
    **model_options,
) -> None:
    """A stream fit through the Python API (the Trainer timelit's CLI builds), with the given callbacks,
    TimeDataModule options (`data_options`) and CLIPFineTuner options."""
    import lightning as L

    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=tasks,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=-1,
        reload_dataloaders_every_n_epochs=1,
        use_distributed_sampler=False,
        logger=L.pytorch.loggers.TensorBoardLogger(run_dir, name="run", version=""),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(*stream_modules(benchmark, tasks, steps, data_options, **model_options), ckpt_path=ckpt_path)


def stream_modules(benchmark: Path, tasks: int, steps: int, data_options: dict | None = None, **model_options) -> tuple:
    """The CLIPFineTuner and TimeDataModule of `fit_stream`."""
    from timelit.data.datamodule import TimeDataModule
    from timelit.training.model import CLIPFineTuner

    base = str(benchmark / "base_model.safetensors")
    model = CLIPFineTuner(model_name=MICRO, pretrained=base, lr=1e-3, **model_options)
    data = TimeDataModule(
        data_root=str(benchmark), manifests=str(benchmark), stream="random", num_tasks=tasks, batch_size=16,
        pretraining_pool="SYNTH_POOL", steps_per_task=steps, num_workers=0, eval_batch_size=64,
        **(data_options or {}),
    )  # fmt: skip
    return model, data


@pytest.fixture(scope="session")
def stream_fit():
    """`fit_stream` for tests (test modules cannot import conftest under pytest's importlib mode)."""
    return fit_stream


@pytest.fixture(scope="session")
def stream_parts():
    """`stream_modules` for tests."""
    return stream_modules


def damage_image(index, position: int) -> None:
    """Overwrite the image bytes of sample `position` of a ShardIndex in its shard, in place (a bad sector, a bad
    copy): the sample still parses as tar records, and its image no longer decodes."""
    import io
    import tarfile

    offset, length = int(index.offset[position]), int(index.length[position])
    with open(index.directory / index.shards[int(index.shard[position])], "r+b") as shard:
        shard.seek(offset)
        with tarfile.open(fileobj=io.BytesIO(shard.read(length)), mode="r:") as sample:
            image = next(m for m in sample if m.name.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg", "webp"))
        shard.seek(offset + image.offset_data)
        shard.write(b"\xff" * image.size)


@pytest.fixture(scope="session")
def damage_sample():
    """`damage_image` for tests."""
    return damage_image
