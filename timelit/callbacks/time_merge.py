"""TimeMerge: the TIME protocol at every task boundary.

    timelit fit --config best_in_time.yaml --protocol.init ema --protocol.deploy ema

At the end of task t (its last training batch, before its evaluation) rank 0 stores the expert θ_t in the
ExpertStore and writes the merged weights the protocol needs (the task EMA m_t, the merge of all experts, or the
expert merged with θ0; the rules are in timelit.protocol) as safetensors files beside the experts; every rank waits,
then reads the same files, so all ranks hold bitwise equal weights. The deployed weights are swapped in for the
evaluation and out after it; at the start of task t+1 the init weights are loaded from those files. θ0 comes from
the LightningModule (`zero_shot_weights`), which rebuilds it from `pretrained`.

Files, in `<run dir>/experts/` (or `store_dir`): `base.safetensors` (θ0), `expert_NNNN.safetensors` (every task's),
`ema_NNNN` / `all_NNNN` / `ft_zs_NNNN` (the last two tasks' unless `keep_merged`); and after the last task
`<run dir>/final_model.safetensors`. A sequential technique (`opcm`) folds the newest expert into the previous task's
merged file and carries its few numbers in this callback's state and in the file's metadata (`timelit.merge_state`).
`all` with an incremental technique (TIES, task arithmetic, ...; `protocol.fold_all`) keeps the running state of
its merge in `all_state_NNNN.safetensors` (the last two tasks') and folds in the newest expert only.

Checkpoint: this callback's state holds the expert index (file names and sha256), the last started and finished
task, the sha256 of every merged file it may still read (all verified on restore) and a sequential technique's
state; the module's `state_dict` holds the live weights. `timelit validate|test --ckpt_path CKPT` evaluates the
weights deployed after CKPT's last finished task, not the live ones. docs/ARCHITECTURE.md has why each file is kept.
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

from timelit.atomic import atomic_file
from timelit.callbacks.results import run_directory
from timelit.disk_space import DiskSpaceError, space_shortfalls
from timelit.merging import (
    TECHNIQUES,
    ExpertStore,
    MergeMethod,
    MergeState,
    SequentialTechnique,
    load_weights,
    merge_step,
    save_weights,
    validate,
)
from timelit.merging.running import state_bytes
from timelit.merging.safetensors_io import file_sha256
from timelit.protocol import (
    WEIGHTED_ALL,
    Deploy,
    EmaStart,
    Init,
    Weighting,
    check_technique,
    fold_all,
    incremental_all,
    merge_all,
    pairwise,
)

log = logging.getLogger(__name__)

BASE_FILE = "base.safetensors"
FINAL_FILE = "final_model.safetensors"


def _merged_task(name: str) -> int:
    """The task of a merged file's name (`ema_0003.safetensors` -> 3)."""
    return int(name.removesuffix(".safetensors").rsplit("_", 1)[1])


def _intact(path: Path, digest: str | None) -> bool:
    """Whether `path` is the file a checkpoint recorded with sha256 `digest` (None: it recorded none)."""
    return digest is not None and path.exists() and file_sha256(path) == digest


def _checkpoint_state(ckpt_path: str | None, key: str) -> dict[str, Any] | None:
    """The state a callback saved under `key` in a Lightning checkpoint (memory-mapped: the weights are not read)."""
    if not ckpt_path:
        return None
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint.get("callbacks", {}).get(key)


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class TimeMerge(Callback):
    """Initialise each expert and deploy after each task as a TIME protocol says (see the module docstring).

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
        if ema_start not in ("base", "first_expert"):
            raise ValueError(f"protocol.ema_start must be 'base' or 'first_expert', got '{ema_start}'")
        if not 0.0 <= ema_weight <= 1.0:
            raise ValueError(f"protocol.ema_weight must lie in [0, 1], got {ema_weight}")
        self.init, self.deploy, self.technique = init, deploy, technique
        self.hparams = dict(hparams or {})
        check_technique(technique, self.hparams)
        # Settings of `all` that would be ignored, or fail only at the first task boundary: refuse them now.
        uses_all = "all" in (init, deploy)
        for name, value, default in (
            ("all_weighting", all_weighting, "uniform"),
            ("all_include_base", all_include_base, False),
        ):
            if value != default and not uses_all:
                raise ValueError(
                    f"protocol.{name}={value!r} has no effect: neither init ({init}) nor deploy ({deploy}) is 'all'"
                )
        if all_weighting != "uniform" and technique not in WEIGHTED_ALL:
            raise ValueError(
                f"protocol.all_weighting={all_weighting!r} weights an average; technique '{technique}' merges task "
                f"vectors (use one of {list(WEIGHTED_ALL)}, or all_weighting: uniform)"
            )
        self.ema_weight, self.ema_start = ema_weight, ema_start
        self.all_weighting, self.all_include_base = all_weighting, all_include_base
        self.store_dir, self.keep_merged = store_dir, keep_merged
        self.sequential = issubclass(TECHNIQUES[technique], SequentialTechnique)
        self.merge_state: MergeState | None = None  # a sequential technique's state after `finished_task`
        self.started_task = -1  # the last task whose init weights were loaded
        self.finished_task = -1  # the last task whose expert and merged weights are on disk
        self.merged_hashes: dict[str, str] = {}
        self.boundary_seconds: dict[int, float] = {}
        self._store: ExpertStore | None = None
        self._pending_state: dict[str, Any] | None = None
        self._live: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------- files

    @property
    def kinds(self) -> set[str]:
        """Merged weights this protocol needs at each boundary."""
        return {self.init, self.deploy} & {"ema", "all", "ft_zs"}

    def directory(self, trainer: L.Trainer) -> Path:
        return self.store_directory(run_directory(trainer))

    def state_file(self, trainer: L.Trainer, task: int) -> Path:
        """The running state of `all` after `task` (incremental techniques)."""
        return self.directory(trainer) / f"all_state_{task:04d}.safetensors"

    @property
    def folds_all(self) -> bool:
        """Whether `all` is carried as running state (`protocol.fold_all`) rather than merged again."""
        return "all" in self.kinds and not self.sequential and incremental_all(self.technique)

    def store_directory(self, run_dir: Path) -> Path:
        """Where experts and merged weights go for a run folder: `store_dir`, or `<run dir>/experts`. Apart from
        `directory` so that code running on rank 0 alone before fit (timelit.run_folder) can ask without caching
        the run folder on that rank only, which would skip a broadcast the other ranks then wait in."""
        return Path(self.store_dir).expanduser() if self.store_dir else run_dir / "experts"

    def artefact(self, trainer: L.Trainer, kind: str, task: int) -> Path:
        """The file holding `kind` (ft = the expert, ema, all, ft_zs) after `task`."""
        if kind == "ft":
            return self.store.path(task)
        return self.directory(trainer) / f"{kind}_{task:04d}.safetensors"

    @property
    def store(self) -> ExpertStore:
        assert self._store is not None, "TimeMerge used before setup()"
        return self._store

    # ---------------------------------------------------------------- set-up

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value or self._store is not None:
            return
        directory = self.directory(trainer)  # resolved on every rank: rank-0-only code must not run a collective
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("timelit-experts-dir")
        self._store = ExpertStore(directory)
        if self._pending_state is not None:
            self._restore(self._pending_state)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        base_path = self.directory(trainer) / BASE_FILE
        if trainer.is_global_zero and not base_path.exists():
            save_weights(base_path, self._base(pl_module), {"timelit.kind": "base"})
        trainer.strategy.barrier("timelit-base")

    @staticmethod
    def _base(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        base = getattr(pl_module, "zero_shot_weights", None)
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
        if task == 0:
            return  # every protocol starts the first task from θ0
        if self.finished_task != task - 1:
            raise RuntimeError(f"task {task} starts but the boundary of task {task - 1} was not processed")
        if self.init == "zs":
            weights = self._base(pl_module)
        else:
            weights = load_weights(self.artefact(trainer, self.init, task - 1))
        pl_module.model.load_state_dict(weights)
        log.info("task %d starts from %s", task, "θ0" if self.init == "zs" else f"{self.init} of task {task - 1}")

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
        """Why the disk cannot take this boundary's files, or None: the expert and the merged files (each the size of
        θ0), the final model after the last task, and the task-end last.ckpt (the size of the previous one, or three
        times the weights before the first: weights and AdamW's two moments). Checked before anything is written,
        so a short disk stops the run here with the previous last.ckpt and the files it lists intact, instead of
        failing halfway through the boundary."""
        weights = sum(t.numel() * t.element_size() for t in self._base(pl_module).values())
        names = [self.store.path(task).name, *(self.artefact(trainer, kind, task).name for kind in sorted(self.kinds))]
        needs: dict[Path, int] = {self.directory(trainer): len(names) * weights}
        if self.folds_all:
            numels = [t.numel() for t in self._base(pl_module).values() if t.is_floating_point()]
            needs[self.directory(trainer)] += state_bytes(validate(self.technique, self.hparams), numels)
            names.append(self.state_file(trainer, task).name)
        if task == getattr(trainer.datamodule, "num_tasks", trainer.max_epochs) - 1:  # type: ignore[union-attr]
            run_dir = run_directory(trainer)
            needs[run_dir] = needs.get(run_dir, 0) + weights
            names.append(FINAL_FILE)
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath:
            last = Path(dirpath) / "last.ckpt"
            needs[Path(dirpath)] = needs.get(Path(dirpath), 0) + (last.stat().st_size if last.exists() else 3 * weights)
            names.append("last.ckpt")
        short = space_shortfalls(needs)
        if not short:
            return None
        return (
            f"not enough disk space for the files of task {task}'s boundary ({', '.join(names)}): {'; '.join(short)}. "
            "Nothing of it was written and the previous last.ckpt is intact: free space, then run the same command "
            "to resume"
        )

    def _expert_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if hasattr(callback, "averaged_weights"):
                return callback.averaged_weights(trainer, pl_module)  # the step-level EMA is the expert
        return _cpu_copy(pl_module.model)

    def _write_boundary(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        base = self._base(pl_module)
        expert = self._expert_weights(trainer, pl_module)
        metadata = {"timelit.protocol": f"{self.init}/{self.deploy}", "timelit.technique": self.technique}
        self.store.add(task, expert, metadata)
        experts = [str(self.store.path(t)) for t in self.store.tasks if t <= task]
        merged: dict[str, dict[str, torch.Tensor]] = {}
        carried = {"ema", "all"} & self.kinds if self.sequential else set()
        if carried:
            merged.update(dict.fromkeys(carried, self._fold_newest(trainer, base, expert, task, carried)))
        if "ema" in self.kinds - carried:
            if task == 0:
                merged["ema"] = (
                    expert
                    if self.ema_start == "first_expert"
                    else pairwise(base, base, expert, self.technique, self.hparams, self.ema_weight)
                )
            else:
                previous = str(self.artefact(trainer, "ema", task - 1))
                merged["ema"] = pairwise(base, previous, expert, self.technique, self.hparams, self.ema_weight)
        if "all" in self.kinds - carried and self.folds_all:
            hashes = {entry["task"]: entry["sha256"] for entry in self.store.index()}
            previous = self.state_file(trainer, task - 1) if task else None
            merged["all"] = fold_all(
                base,
                experts,
                [hashes[t] for t in self.store.tasks if t <= task],
                self.technique,
                self.hparams,
                previous,
                self.state_file(trainer, task),
                self.all_include_base,
            )
        elif "all" in self.kinds - carried:
            merged["all"] = merge_all(
                base, experts, self.technique, self.hparams, self.all_weighting, self.all_include_base
            )
        if "ft_zs" in self.kinds:
            merged["ft_zs"] = pairwise(base, base, expert, self.technique, self.hparams, self.ema_weight)
        for kind, weights in merged.items():
            path = self.artefact(trainer, kind, task)
            extra = {"timelit.merge_state": json.dumps(self.merge_state)} if kind in carried else {}
            self.merged_hashes[path.name] = save_weights(path, weights, {**metadata, **extra, "timelit.kind": kind})
        self._forget_old(trainer, task)

    def _fold_newest(
        self,
        trainer: L.Trainer,
        base: dict[str, torch.Tensor],
        expert: dict[str, torch.Tensor],
        task: int,
        kinds: set[str],
    ) -> dict[str, torch.Tensor]:
        """A sequential technique's running merge with θ_task folded in; `ema` and `all` are that same merge.

        It reads the previous task's merged file and the state of the last finished task (restored from the
        checkpoint on resume), and moves the state on to this task's."""
        previous = None if task == 0 else str(self.artefact(trainer, "ema" if "ema" in kinds else "all", task - 1))
        weights, self.merge_state = merge_step(base, previous, expert, self.technique, self.merge_state, **self.hparams)
        return weights

    def _forget_old(self, trainer: L.Trainer, task: int) -> None:
        """Remove merged files and `all` states two or more tasks old: the newest checkpoint can only refer to the
        last two (a resume redoes at most the boundary after it, which reads the state of the task before)."""
        if task >= 2:
            self.state_file(trainer, task - 2).unlink(missing_ok=True)
        if self.keep_merged:
            return
        for kind in self.kinds:
            old = self.artefact(trainer, kind, task - 2)
            if task >= 2 and old.exists():
                old.unlink()
                self.merged_hashes.pop(old.name, None)

    # ---------------------------------------------------------------- evaluation of the deployed weights

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._deploy_checkpoint(trainer, pl_module)
            return
        task = trainer.current_epoch
        if trainer.sanity_checking or self.finished_task != task:
            return  # before the stream, or in the middle of a task: evaluate the weights being trained
        self._swap_in(pl_module, self.artefact(trainer, self.deploy, task))

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
        if self.deploy == "ft":
            digests = {e["file"]: e["sha256"] for e in state["store"]["experts"]}
            name = f"expert_{task:04d}.safetensors"
        else:
            digests, name = state.get("merged", {}), f"{self.deploy}_{task:04d}.safetensors"
        path = self.directory(trainer) / name
        if not _intact(path, digests.get(name)):
            raise FileNotFoundError(
                f"{path}: the weights deployed ({self.deploy}) after task {task} of {trainer.ckpt_path} are missing "
                "or changed since it was saved. Is protocol.deploy the run's? To evaluate a weights file instead: "
                "--model.init_args.pretrained FILE --ckpt_path null"
            )
        self._swap_in(pl_module, path)
        log.info("evaluating the weights deployed (%s) after task %d: %s", self.deploy, task, path)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_live(pl_module)  # before ModelCheckpoint (which Lightning runs last) saves on the exception

    def _restore_live(self, pl_module: L.LightningModule) -> None:
        if self._live is not None:
            pl_module.model.load_state_dict(self._live)
            self._live = None

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = getattr(trainer.datamodule, "num_tasks", trainer.max_epochs) - 1  # type: ignore[union-attr]
        if trainer.is_global_zero and self.finished_task == last:
            final = run_directory(trainer) / FINAL_FILE
            with atomic_file(final) as file, open(self.artefact(trainer, self.deploy, last), "rb") as source:
                shutil.copyfileobj(source, file)
            log.info("deployed weights after the last task (%s): %s", self.deploy, final)

    # ---------------------------------------------------------------- records and checkpoint

    def run_record(self, trainer: L.Trainer) -> dict[str, Any]:
        return {
            "protocol": {
                "init": self.init,
                "deploy": self.deploy,
                "technique": self.technique,
                "hparams": self.hparams,
                "ema_weight": self.ema_weight,
                "ema_start": self.ema_start,
                "all_weighting": self.all_weighting,
                "all_include_base": self.all_include_base,
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
            "merged": dict(self.merged_hashes),
            "merge_state": self.merge_state,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._state() if self._store is not None else dict(self._pending_state or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._store is None:
            self._pending_state = state_dict
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any], verify: bool = True) -> None:
        self.store.load_state_dict(state["store"], verify=verify)
        self.finished_task = int(state["finished_task"])
        self.started_task = int(state.get("started_task", self.finished_task))
        self.merged_hashes = dict(state.get("merged", {}))
        self.merge_state = state.get("merge_state")
        if verify:
            self._verify_merged()
        self._pending_state = None

    def _verify_merged(self) -> None:
        """Check the merged files the resumed run will read: those of the last finished task (the next init, the
        next EMA step, the deployed weights). Older ones may be gone: a run killed after the boundary of the next
        task, before its task-end checkpoint, had already removed them (`_forget_old`), and nothing reads them."""
        for name, digest in list(self.merged_hashes.items()):
            path = self.store.directory / name
            if _merged_task(name) < self.finished_task and not path.exists():
                del self.merged_hashes[name]
            elif not _intact(path, digest):
                raise FileNotFoundError(f"{path}: merged weights listed in the checkpoint are missing or changed")
