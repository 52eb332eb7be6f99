"""What the training benchmarks run: `timelit fit` as the CLI builds it, a plain PyTorch loop, and a callback that
alternates the two step by step inside one fit so that both see the same machine load.

    python bench/train_overhead.py --quick

* `fit_args(...)` are the arguments of `timelit fit --config quickstart.yaml` with the data, model and run folder
  of the benchmark; `timelit.commands.cli.run_lightning` turns them into the Trainer with TimeMerge, ComputeBudget,
  TaskResults, StreamCheckpoint and Preemption, exactly as a user's command does.
* `InMemoryTimeData` is TimeDataModule whose training loaders serve batches built once by the real pipeline
  (`task_batches`), so a step costs the model's work and Lightning's, and no decoding (or, with
  `serve_from_memory: false`, the real shard loaders, keeping the cache for the plain loop).
* `PlainLoop` is the same training step written as a reader of nanoGPT would: forward, open_clip's ClipLoss,
  backward, gradient clipping at 1.0, AdamW with the same parameter groups and hyperparameters, warm-up + cosine.
  It imports torch and open_clip only (timelit.training.clip just registers the tiny model configs). What it
  trains and with which AdamW settings is a `PlainRecipe`, which `BareLightning` takes too.
* `SideBySide` runs blocks of plain steps between blocks of timelit's steps, on the same batches, and times each
  step of both. A timelit step is the time from one `on_train_batch_end` to the next, less the plain block, so it
  holds everything a step of `timelit fit` does: data fetch, every hook, logging, the optimizer step, checkpoints.
* `BareLightning` + `bare_fit` are the plain loop's step as a LightningModule with no timelit code around it, to
  split the overhead into Lightning's loop and timelit's own module and callbacks.
* `BeforeFixes` puts back what timelit did before its three overhead fixes (per-call `torch.manual_seed`, tarfile
  for every sample, every scalar logged at every step), so a benchmark runs "before" and "now" in one process.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from timelit.data.datamodule import TimeDataModule
from timelit.data.loaders import TaskBatches, TaskLoader

_CACHE: dict[tuple, list[dict[str, Any]]] = {}


class InMemoryBatches(TaskBatches):
    """A task's batches served from memory, cycling over `cached` (built by the real pipeline)."""

    def __init__(self, real: TaskBatches, cached: list[dict[str, Any]]):
        super().__init__(real.task, real.steps, real.parts, real.reader, real.transform, real.tokenizer, real.seed)
        self.cached = cached

    def batch(self, batch_index: int) -> dict[str, Any]:
        return self.cached[batch_index % len(self.cached)]


class InMemoryTimeData(TimeDataModule):
    """TimeDataModule whose training loader yields `cached_batches` pre-decoded batches of task 0 in a cycle.

    Args:
        serve_from_memory: serve the cached batches (false: the real shard loaders; the cache still feeds the plain
            loop of SideBySide).
        cached_batches: how many distinct batches to decode once (per data root and batch size) and cycle over.
    """

    def __init__(self, *args: Any, serve_from_memory: bool = True, cached_batches: int = 8, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.serve_from_memory = serve_from_memory
        self.cached_batches = cached_batches

    def cached(self) -> list[dict[str, Any]]:
        key = (str(self.data_root), self.batch_size, self.cached_batches, self.seed, self.num_tasks)
        if key not in _CACHE:
            real = self.task_batches(0)
            batches = [real.batch(i) for i in range(self.cached_batches)]
            if torch.cuda.is_available():  # pinned once, so that both sides copy to the GPU asynchronously
                batches = [
                    {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches
                ]
            _CACHE[key] = batches
        return _CACHE[key]

    def train_dataloader(self) -> TaskLoader:
        if not self.serve_from_memory:
            return super().train_dataloader()
        real = self.task_batches(self.trainer.current_epoch)  # type: ignore[union-attr]
        return TaskLoader(InMemoryBatches(real, self.cached()), num_workers=0)


def fit_args(
    data_root: Path,
    run_dir: Path,
    model_name: str,
    pretrained: Path | None,
    tasks: int,
    steps: int,
    batch_size: int,
    gflops_per_step: float,
    in_memory: bool,
    num_workers: int,
    checkpoint_every: int = 50,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """`timelit fit --config quickstart.yaml` on the benchmark's data, with the budget set to buy `steps` steps."""
    args = [
        "fit",
        "--config",
        "quickstart.yaml",
        "--model.init_args.model_name",
        model_name,
        "--model.init_args.pretrained",
        str(pretrained) if pretrained else "null",
        "--data.class_path",
        "_fit.InMemoryTimeData",
        "--data.init_args.serve_from_memory",
        str(in_memory).lower(),
        "--data.init_args.data_root",
        str(data_root),
        "--data.init_args.manifests",
        str(data_root),
        "--data.init_args.num_tasks",
        str(tasks),
        "--data.init_args.batch_size",
        str(batch_size),
        "--data.init_args.num_workers",
        str(num_workers),
        "--data.init_args.synthesize_if_missing",
        "false",
        # The budget buys exactly `steps` per task (ComputeBudget rounds to the nearest step), as quickstart.yaml's.
        "--budget.gflops_per_task",
        repr(gflops_per_step * steps),
        "--budget.total_gflops",
        "null",
        "--checkpoint.every_n_train_steps",
        str(checkpoint_every),
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        "--ckpt_path",
        "null",
        *extra,
    ]
    return args


def run_fit(args: list[str]) -> Any:
    """`timelit fit ARGS` in this process; returns the LightningCLI (its trainer holds the callbacks)."""
    from timelit.commands.cli import run_lightning

    return run_lightning(args)


# --------------------------------------------------------------------------- the plain loop


def _lr_factor(step: int, steps_per_task: int, warmup_fraction: float, min_ratio: float) -> float:
    step %= steps_per_task
    warmup = math.ceil(warmup_fraction * steps_per_task)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps_per_task - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class PlainRecipe:
    """What the plain step trains: the open_clip model `model_name`, tasks of `steps_per_task` steps (the schedule
    restarts every task) and AdamW's hyperparameters, under CLIPFineTuner's names (SideBySide reads them from the
    fitted module's hparams)."""

    model_name: str
    steps_per_task: int
    lr: float = 1e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @classmethod
    def of(cls, hparams: Any, steps_per_task: int) -> PlainRecipe:
        """The recipe of a fitted module (CLIPFineTuner or BareLightning) from its hparams."""
        return cls(
            hparams.model_name, steps_per_task, hparams.lr, hparams.weight_decay, tuple(hparams.betas), hparams.eps
        )

    def optimizer(
        self, model: torch.nn.Module, fused: bool
    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW without decay on gains, biases and logit_scale, and warm-up + cosine restarted every task, written
        without timelit's code (timelit.training.optim is what is being measured against)."""
        exempt = {n for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n}
        decay = [p for n, p in model.named_parameters() if n not in exempt]
        no_decay = [p for n, p in model.named_parameters() if n in exempt]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=fused)
        steps = self.steps_per_task
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, 0.1, 0.001))
        return optimizer, schedule


class PlainLoop:
    """One open_clip model trained by hand: the reference a researcher would write instead of timelit."""

    def __init__(
        self,
        recipe: PlainRecipe,
        weights: dict[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        precision: str = "32",
        fused: bool = True,
    ):
        from open_clip.loss import ClipLoss

        from timelit.training.clip import build_clip

        self.model = build_clip(recipe.model_name).model.to(device)
        if weights is not None:
            self.model.load_state_dict(weights)
        self.model.train()
        # Fused by default, as CLIPFineTuner's AdamW on a CPU; SideBySide passes the fit's own choice.
        self.optimizer, self.schedule = recipe.optimizer(self.model, fused)
        self.loss_fn = ClipLoss()
        self.device = torch.device(device)
        self.autocast = precision == "bf16-mixed"

    def step(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["image"].to(self.device, non_blocking=True)
        texts = batch["text"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            image_features, text_features, logit_scale = self.model(images, texts)
            loss = self.loss_fn(image_features, text_features, logit_scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        return loss.detach()


def time_plain(loop: PlainLoop, batches: list[dict[str, Any]], steps: int, start: int = 0) -> list[float]:
    """Seconds of each of `steps` plain steps (synchronised on a GPU)."""
    times = []
    for i in range(steps):
        began = time.perf_counter()
        loop.step(batches[(start + i) % len(batches)])
        if loop.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return times


class BareLightning(L.LightningModule):
    """PlainLoop's step as the smallest LightningModule: forward, ClipLoss, the same AdamW groups and schedule, with
    gradient clipping left to the Trainer. Fitted with no callback but SideBySide, no logger, no progress bar, so
    that what Lightning's own loop costs is told apart from what timelit's module and callbacks add."""

    def __init__(self, recipe: PlainRecipe, weights: dict[str, torch.Tensor] | None = None):
        super().__init__()
        from open_clip.loss import ClipLoss

        from timelit.data.datamodule import Preprocessing
        from timelit.training.clip import build_clip

        self.recipe = recipe
        # Flat, under CLIPFineTuner's names: SideBySide builds its PlainLoop from these.
        self.save_hyperparameters(asdict(recipe))
        bundle = build_clip(recipe.model_name)
        self.model = bundle.model
        if weights is not None:
            self.model.load_state_dict(weights)
        self._preprocessing = Preprocessing(bundle.train_transform, bundle.eval_transform, bundle.tokenizer)
        self.loss_fn = ClipLoss()

    def preprocessing(self) -> Any:
        return self._preprocessing

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image_features, text_features, logit_scale = self.model(batch["image"], batch["text"])
        return self.loss_fn(image_features, text_features, logit_scale)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, schedule = self.recipe.optimizer(self.model, fused=True)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def bare_fit(data: InMemoryTimeData, model: BareLightning, tasks: int, block: int) -> SideBySide:
    """`model` fitted on `data`'s in-memory batches for `tasks` epochs with SideBySide alone; returns SideBySide."""
    side = SideBySide(block=block)
    trainer = L.Trainer(
        max_epochs=tasks, accelerator="cpu", devices=1, gradient_clip_val=1.0, callbacks=[side], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model, data)
    return side


# --------------------------------------------------------------------------- side by side


class SideBySide(Callback):
    """Times every training step of the fit and, every `block` steps, runs `block` plain steps on the same batches.

    A timelit step's time is measured between consecutive `on_train_batch_end` calls, minus the plain block run
    between them; the first step of every task (its interval spans the task boundary, evaluation and loader start)
    is recorded apart, as are the first `warmup` steps of the fit.

    Args:
        block: steps per block (timelit then plain); 0 times timelit alone.
        warmup: steps of each side discarded at the start.
    """

    def __init__(self, block: int = 10, warmup: int = 3):
        self.block, self.warmup = block, warmup
        self.timelit: list[dict[str, Any]] = []  # {"task", "batch", "seconds"}
        self.plain: list[dict[str, Any]] = []  # {"block", "seconds"}
        self.boundaries: list[float] = []
        self.loop: PlainLoop | None = None
        self._last: float | None = None
        self._in_block = 0
        self._blocks = 0
        self._plain_steps = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.block:
            weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            self.loop = PlainLoop(
                PlainRecipe.of(pl_module.hparams, trainer.datamodule.require_steps()),
                weights,
                device=pl_module.device,
                precision=str(trainer.precision),
                fused=bool(trainer.optimizers[0].defaults.get("fused")),  # the same AdamW kernel as the fit's
            )
            self.batches = trainer.datamodule.cached()
            self.loop.step(self.batches[0])  # allocate its optimizer state before any timing
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = _synchronised(pl_module)
        seconds = now - self._last if self._last is not None else float("nan")
        if batch_idx == 0:
            self.boundaries.append(seconds)
        else:
            self.timelit.append({"task": trainer.current_epoch, "batch": batch_idx, "seconds": seconds})
            self._in_block += 1
        if self.loop is not None and self._in_block >= self.block:
            for seconds in time_plain(self.loop, self.batches, self.block, self._plain_steps):
                self.plain.append({"block": self._blocks, "seconds": seconds})
            self._plain_steps += self.block
            self._blocks += 1
            self._in_block = 0
            now = _synchronised(pl_module)
        self._last = now

    def summary(self) -> dict[str, Any]:
        from _common import median

        lit = [r["seconds"] for r in self.timelit][self.warmup :]
        plain = [r["seconds"] for r in self.plain][self.warmup :]
        # Per block: the median step of each side, and their ratio; blocks ran back to back, under the same load.
        ratios = []
        for b in range(self._blocks):
            lit_b = [r["seconds"] for r in self.timelit[b * self.block : (b + 1) * self.block]]
            plain_b = [r["seconds"] for r in self.plain if r["block"] == b]
            if b > 0 and lit_b and plain_b:
                ratios.append(median(lit_b) / median(plain_b))
        return {
            "timelit_steps": len(lit),
            "plain_steps": len(plain),
            "timelit_median_s": median(lit),
            "plain_median_s": median(plain),
            "timelit_mean_s": sum(lit) / len(lit) if lit else float("nan"),
            "plain_mean_s": sum(plain) / len(plain) if plain else float("nan"),
            "block_ratios": ratios,
            "median_block_ratio": median(ratios),
            "first_step_of_task_s": self.boundaries,
        }


def _synchronised(pl_module: Any) -> float:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# --------------------------------------------------------------------------- timelit as it was before the fixes


def _seed_step_before(seed: int) -> None:
    """CLIPFineTuner.on_train_batch_start's seeding before timelit.training.seeding: torch.manual_seed, which on a
    process without CUDA queues a lazy seeding call per device type with `traceback.format_stack()`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _every_step(trainer: Any) -> bool:
    """`reaches_logger` before the fix (timelit.training.lightning_internals): every step logs every scalar."""
    return True


def _no_header_parser(data: bytes) -> None:
    """`tar_members` declining every sample: ShardIndex.read opens each one with tarfile, as before the fix."""
    return None


class BeforeFixes:
    """Context manager putting timelit's behaviour from before the three overhead fixes back, by monkeypatching the
    names in the modules that use them, so that one run measures "before" and "now" side by side (loader workers
    are forked inside the context, so they inherit the patches):

    * `seeding`: every sample's augmentation seed goes through `torch.manual_seed` (timelit.data.loaders'
      `seed_torch_cpu`), and every step's seed through random.seed, np.random.seed and `torch.manual_seed`
      (timelit.training.model's `seed_step`);
    * `logging`: CLIPFineTuner.training_step and ComputeBudget.on_train_batch_end log their scalars at every step
      (`reaches_logger` is always true in timelit.training.model and timelit.training.callbacks.budget);
    * `tar`: ShardIndex.read opens every sample with tarfile (`tar_members` in timelit.data.shards returns None).
    """

    def __init__(self, seeding: bool = True, logging: bool = True, tar: bool = True):
        self.seeding, self.logging, self.tar = seeding, logging, tar
        self._saved: list[tuple[Any, str, Any]] = []

    def _patch(self, module: Any, name: str, value: Any) -> None:
        self._saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    def __enter__(self) -> BeforeFixes:
        import timelit.data.loaders as loaders
        import timelit.data.shards as shards
        import timelit.training.callbacks.budget as budget
        import timelit.training.model as model

        if self.seeding:
            self._patch(loaders, "seed_torch_cpu", torch.manual_seed)
            self._patch(model, "seed_step", _seed_step_before)
        if self.logging:
            self._patch(model, "reaches_logger", _every_step)
            self._patch(budget, "reaches_logger", _every_step)
        if self.tar:
            self._patch(shards, "tar_members", _no_header_parser)
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, value in reversed(self._saved):
            setattr(module, name, value)
        self._saved = []
