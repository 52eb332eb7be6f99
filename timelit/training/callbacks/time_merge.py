"""TimeMerge: the TIME protocol at every task boundary, wired to Lightning's hooks.

    timelit fit --config best_in_time.yaml --protocol.init ema --protocol.deploy ema

The rules (what a task starts from, what is deployed, what a boundary merges) are pure functions in
timelit.training.protocol; the files (names, hashes, which are kept, disk space) are timelit.merging.merged_files'. This
callback calls them at the right hooks and keeps the ranks in step: at the end of task t rank 0 stores the expert and
writes the merged weights, every rank waits and then reads the same files; the deployed weights are swapped in for
the evaluation and out after it; the init weights are loaded at the first batch of the next task.

Checkpoint: this callback's state holds the expert index (file names and sha256), the last started and finished task,
the sha256 of every merged file it may still read (all verified on restore) and a sequential technique's state; the
module's `state_dict` holds the live weights. `timelit validate|test --ckpt_path CKPT` evaluates the weights
deployed after CKPT's last finished task, not the live ones.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from timelit.merging import ExpertStore, MergeMethod, MergeState, load_weights, validate
from timelit.merging.merged_files import FINAL_FILE, MergedFiles, intact, recorded_file
from timelit.training.callbacks.results import run_directory
from timelit.training.contracts import (
    CheckpointFolder,
    ExpertWeightsSource,
    TaskStream,
    ZeroShotModule,
    callbacks_with,
    datamodule_as,
)
from timelit.training.protocol import (
    BASE,
    Deploy,
    EmaStart,
    Init,
    ProtocolSettings,
    Step,
    Weighting,
    boundary_plan,
    deployed_weights,
    init_weights,
    realise,
)
from timelit.utilities.atomic import atomic_file
from timelit.utilities.disk_space import DiskSpaceError

log = logging.getLogger(__name__)


def _checkpoint_state(ckpt_path: str | None, key: str) -> dict[str, Any] | None:
    """The state a callback saved under `key` in a Lightning checkpoint (memory-mapped: the weights are not read)."""
    if not ckpt_path:
        return None
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint.get("callbacks", {}).get(key)


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _num_tasks(trainer: L.Trainer) -> int:
    stream = datamodule_as(trainer, TaskStream)
    return stream.num_tasks if stream is not None else trainer.max_epochs  # type: ignore[return-value]


class TimeMerge(Callback):
    """Initialise each expert and deploy after each task as a TIME protocol says (timelit.training.protocol).

    Args:
        init: weights the next task starts from: `zs` (θ0), `ft` (last expert), `ema` (task EMA), `all` (merge of
            all experts so far), `ft_zs` (last expert merged with θ0, the pipeline's FT-Merge).
        deploy: weights evaluated and shipped after each task: `ft`, `ema`, `all` or `ft_zs`.
        technique: the merge technique f of the EMA step, of `all` and of `ft_zs` (timelit.merging). A sequential
            one (`opcm`) folds each new expert into its running merge once per boundary, which is then both the
            EMA and `all`. `all` costs the same at every boundary (running state beside the experts, the newest
            expert folded in) with the incremental techniques task_arithmetic, lines, ties, dare, dare_ties,
            breadcrumbs, breadcrumbs_ties, magmax and slerp; with average/interpolation, model_stock, tall_masks,
            consensus_ties, random, tsv, iso_c and iso_cts every boundary merges all experts again (their result
            needs every expert once more: weights or statistics that change with t, or an SVD of the whole set).
        hparams: its hyperparameters, named as in the papers (e.g. `{"k": 0.3, "scope": "tower"}` for TIES).
        ema_weight: weight of the newest expert in the pairwise step, m_t = (1 - w) m_{t-1} + w θ_t (reference:
            0.5); also the expert's weight in `ft_zs`. Used by interpolation, average and SLERP.
        ema_start: `base` starts the EMA at θ0 (TIME, `ema_paint`); `first_expert` at θ_1 (the pipeline's
            `double_merge_*` protocols).
        all_weighting: weights of the experts in `all` under interpolation/average: uniform, or by recency as the
            pipeline's offline merge (`linear`, `sqrt`, `quadratic`, `cubic`, `exp`, `log`, `reverse_*`).
        all_include_base: count θ0 as a member of `all` (the pipeline's `include_zero_shot_in_merge`).
        store_dir: where experts and merged weights go; default `<run dir>/experts`.
        keep_merged: keep every task's merged files instead of the last two.
    """

    def __init__(
        self,
        init: Init = "ema",
        deploy: Deploy = "ema",
        technique: MergeMethod = "interpolation",
        hparams: dict[str, Any] | None = None,
        ema_weight: float = 0.5,
        ema_start: EmaStart = "base",
        all_weighting: Weighting = "uniform",
        all_include_base: bool = False,
        store_dir: str | None = None,
        keep_merged: bool = False,
    ):
        self.settings = ProtocolSettings(
            init, deploy, technique, dict(hparams or {}), ema_weight, ema_start, all_weighting, all_include_base
        )
        self.store_dir, self.keep_merged = store_dir, keep_merged
        self.merge_state: MergeState | None = None  # a sequential technique's state after `finished_task`
        self.started_task = -1  # the last task whose init weights were loaded
        self.finished_task = -1  # the last task whose expert and merged weights are on disk
        self.boundary_seconds: dict[int, float] = {}
        self._files: MergedFiles | None = None
        self._pending_state: dict[str, Any] | None = None
        self._live: dict[str, torch.Tensor] | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        """Merged weights this protocol writes at each boundary."""
        return self.settings.kinds

    def store_directory(self, run_dir: Path) -> Path:
        """Where experts and merged weights go for a run folder: `store_dir`, or `<run dir>/experts`. Takes the run
        folder so that code running on rank 0 alone before fit (timelit.training.run_folder) can ask without caching the
        run folder on that rank only, which would skip a broadcast the other ranks then wait in."""
        return Path(self.store_dir).expanduser() if self.store_dir else run_dir / "experts"

    @property
    def files(self) -> MergedFiles:
        assert self._files is not None, "TimeMerge used before setup()"
        return self._files

    @property
    def store(self) -> ExpertStore:
        return self.files.store

    # ---------------------------------------------------------------- set-up

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value or self._files is not None:
            return
        # Resolved on every rank: rank-0-only code must not run a collective.
        directory = self.store_directory(run_directory(trainer))
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("timelit-experts-dir")
        self._files = MergedFiles(ExpertStore(directory), self.kinds, self.keep_merged)
        if self._pending_state is not None:
            self._restore(self._pending_state)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.settings.check_keys(self._base(pl_module))  # on every rank: each raises, none waits at the barrier
        if trainer.is_global_zero:
            self.files.save_base(self._base(pl_module))
        trainer.strategy.barrier("timelit-base")

    @staticmethod
    def _base(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        base = pl_module.zero_shot_weights if isinstance(pl_module, ZeroShotModule) else None
        if base is None:
            raise RuntimeError("TimeMerge needs a LightningModule with `zero_shot_weights` (θ0), e.g. CLIPFineTuner")
        return base

    # ---------------------------------------------------------------- task start: init weights

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # At the first step of a task rather than in `on_train_epoch_start`, which Lightning skips for the epoch
        # after a resume from a checkpoint taken on a task's last batch. `started_task` is checkpointed, so a resume
        # in the middle of a task keeps the weights it restored.
        if trainer.current_epoch != self.started_task:
            self.start_task(trainer, pl_module, trainer.current_epoch)
            self.started_task = trainer.current_epoch

    def start_task(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        """Load the init weights of `task` into the model (from the files every rank reads alike)."""
        source = init_weights(self.settings, task)
        if source is None:
            return
        if self.finished_task != task - 1:
            raise RuntimeError(f"task {task} starts but the boundary of task {task - 1} was not processed")
        weights = self._base(pl_module) if source == BASE else load_weights(self.files.path(*source))
        pl_module.model.load_state_dict(weights)
        log.info("task %d starts from %s", task, "θ0" if source == BASE else f"{source.kind} of task {source.task}")

    # ---------------------------------------------------------------- task end: expert, merges

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self.finish_task(trainer, pl_module, trainer.current_epoch)

    def finish_task(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        """Store θ_task and write the merged weights the protocol needs; rank 0 writes, every rank waits."""
        started = time.perf_counter()
        # Checked on rank 0, raised on every rank: one rank stopping alone would leave the others in the barrier.
        short = self._space_shortfall(trainer, pl_module, task) if trainer.is_global_zero else None
        short = trainer.strategy.broadcast(short, src=0)
        if short:
            raise DiskSpaceError(short)
        if trainer.is_global_zero:
            self._write_boundary(trainer, pl_module, task)
        trainer.strategy.barrier("timelit-boundary")
        state = trainer.strategy.broadcast(self._state(), src=0)
        if not trainer.is_global_zero:
            self._restore(state, verify=False)
        self.finished_task = task
        self.boundary_seconds[task] = time.perf_counter() - started

    def _space_shortfall(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> str | None:
        settings = self.settings
        folded = validate(settings.technique, dict(settings.hparams)) if settings.folds_all else None
        final = run_directory(trainer) / FINAL_FILE if task == _num_tasks(trainer) - 1 else None
        checkpoint = trainer.checkpoint_callback
        dirpath = checkpoint.dirpath if isinstance(checkpoint, CheckpointFolder) else None
        return self.files.boundary_shortfall(
            task, self._base(pl_module), folded, final, Path(dirpath) if dirpath else None
        )

    def _expert_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        for source in callbacks_with(trainer, ExpertWeightsSource):
            return source.averaged_weights(trainer, pl_module)  # the step-level EMA is the expert
        return _cpu_copy(pl_module.model)

    def _write_boundary(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        base = self._base(pl_module)
        expert = self._expert_weights(trainer, pl_module)
        settings = self.settings
        metadata = {
            "timelit.training.protocol": f"{settings.init}/{settings.deploy}",
            "timelit.technique": settings.technique,
        }
        self.store.add(task, expert, metadata)
        for planned in boundary_plan(settings, task, self.store.tasks):
            weights, self.merge_state = realise(planned.rule, settings, base, expert, self.files, self.merge_state)
            extra = {"timelit.merge_state": json.dumps(self.merge_state)} if isinstance(planned.rule, Step) else {}
            for kind in planned.kinds:
                self.files.save(kind, task, weights, {**metadata, **extra, "timelit.kind": kind})
        self.files.prune(task)

    # ---------------------------------------------------------------- evaluation of the deployed weights

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._deploy_checkpoint(trainer, pl_module)
            return
        task = trainer.current_epoch
        if trainer.sanity_checking or self.finished_task != task:
            return  # before the stream, or in the middle of a task: evaluate the weights being trained
        self._swap_in(pl_module, self.files.path(*deployed_weights(self.settings, task)))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_live(pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._deploy_checkpoint(trainer, pl_module)

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_live(pl_module)

    def _swap_in(self, pl_module: L.LightningModule, path: Path) -> None:
        self._live = _cpu_copy(pl_module.model)
        pl_module.model.load_state_dict(load_weights(path))

    def _deploy_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`timelit validate|test --ckpt_path CKPT` evaluates what the run deployed after CKPT's last finished task
        (the numbers results.json reports), not the expert it was training: a checkpoint's `state_dict` holds the
        live weights. Weights given by `pretrained`, or a checkpoint without TimeMerge state (`timelit merge --out
        x.ckpt`), are evaluated as they are."""
        state = _checkpoint_state(trainer.ckpt_path, self.state_key)
        task = int(state.get("finished_task", -1)) if state else -1
        if task < 0:
            return
        deployed = deployed_weights(self.settings, task)
        name, digest = recorded_file(state, deployed.kind, deployed.task)  # type: ignore[arg-type]
        path = self.store_directory(run_directory(trainer)) / name
        if not intact(path, digest):
            raise FileNotFoundError(
                f"{path}: the weights deployed ({deployed.kind}) after task {task} of {trainer.ckpt_path} are missing "
                "or changed since it was saved. Is protocol.deploy the run's? To evaluate a weights file instead: "
                "--model.init_args.pretrained FILE --ckpt_path null"
            )
        self._swap_in(pl_module, path)
        log.info("evaluating the weights deployed (%s) after task %d: %s", deployed.kind, task, path)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_live(pl_module)  # before ModelCheckpoint (which Lightning runs last) saves on the exception

    def _restore_live(self, pl_module: L.LightningModule) -> None:
        if self._live is not None:
            pl_module.model.load_state_dict(self._live)
            self._live = None

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = _num_tasks(trainer) - 1
        if trainer.is_global_zero and self.finished_task == last:
            final = run_directory(trainer) / FINAL_FILE
            deployed = self.files.path(*deployed_weights(self.settings, last))
            with atomic_file(final) as file, open(deployed, "rb") as source:
                shutil.copyfileobj(source, file)
            log.info("deployed weights after the last task (%s): %s", self.settings.deploy, final)

    # ---------------------------------------------------------------- records and checkpoint

    def run_record(self, trainer: L.Trainer) -> dict[str, Any]:
        settings = self.settings
        return {
            "protocol": {
                "init": settings.init,
                "deploy": settings.deploy,
                "technique": settings.technique,
                "hparams": settings.hparams,
                "ema_weight": settings.ema_weight,
                "ema_start": settings.ema_start,
                "all_weighting": settings.all_weighting,
                "all_include_base": settings.all_include_base,
            }
        }

    def task_record(self, trainer: L.Trainer) -> dict[str, Any]:
        task = trainer.current_epoch
        return {"boundary_seconds": round(self.boundary_seconds.get(task, float("nan")), 3)}

    def _state(self) -> dict[str, Any]:
        return {
            "store": self.store.state_dict(),
            "started_task": self.started_task,
            "finished_task": self.finished_task,
            "merged": dict(self.files.hashes),
            "merge_state": self.merge_state,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._state() if self._files is not None else dict(self._pending_state or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._files is None:
            self._pending_state = state_dict
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any], verify: bool = True) -> None:
        self.store.load_state_dict(state["store"], verify=verify)
        self.finished_task = int(state["finished_task"])
        self.started_task = int(state.get("started_task", self.finished_task))
        self.files.restore(state.get("merged", {}), self.finished_task, verify=verify)
        self.merge_state = state.get("merge_state")
        self._pending_state = None
