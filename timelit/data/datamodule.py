"""TimeDataModule: the stream of tasks, each a mixture of current data, replay and a pretraining pool.

    timelit fit --config quickstart.yaml --data.num_workers 2

Task t is epoch t of the trainer. Its training loader yields `steps_per_task` batches on every rank (set directly, or
derived from the compute budget by the ComputeBudget callback), mixing the current task's samples, replay of the
samples of tasks < t and the pretraining pool (`timelit.data.mixture`). Validation has one loader per evaluation
dataset: the adaptation datasets of the stream and the held-out datasets, on their fixed subsets during the stream
and on the full test splits at the start and the end (`full_eval`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.trainer.states import TrainerFn

from timelit.data.device_images import CachedTokenizer, DeviceTransform, ImagePipeline, collate_regions, decode_pixels
from timelit.data.loaders import (
    EvalBatches,
    EvalLoader,
    OnCorrupt,
    SampleReader,
    SourcePart,
    StoppableLoader,
    TaskBatches,
    TaskLoader,
    encode,
    eval_workers,
    loader_kwargs,
)
from timelit.data.manifest import DatasetManifest, ManifestSet, load_manifests
from timelit.data.mixture import Mixture, SourceSequence, pool_offsets, rank_slices, source_counts
from timelit.data.shard_sizes import shard_size_problems
from timelit.data.shards import ShardIndex
from timelit.data.streams import Stream, load_stream
from timelit.training.evaluation.subsets import SubsetRule

log = logging.getLogger(__name__)

EvalPoint = Literal["start", "end"]


@dataclass
class EvalSpec:
    """What the evaluator needs to know about one evaluation dataset."""

    name: str
    role: Literal["adapt", "eval"]
    task: Literal["classification", "retrieval"]
    classnames: tuple[str, ...]
    prompt_templates: tuple[str, ...]
    num_samples: int
    subset: np.ndarray = field(repr=False)


@dataclass
class Preprocessing:
    """The model's image transforms and tokenizer, applied in loader workers."""

    train_transform: Any
    eval_transform: Any
    tokenizer: Any


class TimeDataModule(L.LightningDataModule):
    """The FoMo-in-Flux stream as Lightning data: one training loader per task, one validation loader per dataset.

    Args:
        data_root: folder of prepared shards, `<data_root>/<DATASET>/<split>-000000.tar` plus indexes.
        manifests: the manifest set: `fomo_in_flux` (shipped) or a folder (the quickstart's lives with its data).
        stream: a stream name from the manifest set's `streams/`, or a path to a stream JSON.
        num_tasks: how many tasks the stream is cut into (the trainer's `max_epochs` follows it).
        task_boundaries: `equal` cuts the stream into tasks of near-equal concept counts (the reference);
            `dataset` starts a task wherever the dataset changes (dataset-incremental streams).
        batch_size: the global batch size, across ranks and sources (reference: 512).
        mixture: shares of the pretraining pool, the current task and replay in every batch.
        pretraining_pool: name of a pool in the manifest set; required when `mixture.pretraining > 0`.
        steps_per_task: training steps of every task; left empty when a ComputeBudget callback derives it.
        eval_datasets: datasets to evaluate; default: the stream's adaptation datasets and every held-out dataset.
        eval_batch_size: per-rank batch size of evaluation.
        eval_subset: the rule for the fixed evaluation subsets used during the stream.
        full_eval: where to evaluate on the full test splits as well: before the stream, after it, or both.
        num_workers: loader worker processes per rank.
        on_corrupt: a sample that does not decode is skipped (replaced in training batches; counted and reported by
            the `skipped` section, SkippedSamples), or stops the run.
        seed: seeds every shuffle of the data (linked to `seed_everything` by the CLI).
        synthesize_if_missing: write the procedural quickstart benchmark into `data_root` if it is not there.
        synthesize_size: which size of it: `quickstart` (4 adaptation datasets) or `science` (12; the study's).
        images: where images are resized and normalised. `host`: open_clip's transforms in the loader workers (PIL,
            float batches; what every shipped config runs). `device`: the workers decode and draw the same crop
            boxes, batches carry uint8 crops, and the resize (the same antialiased bicubic filter, in float32) and
            normalisation run on the training device after the batch is copied: ~3x less CPU per sample
            (bench/README.md, section 2b). Pixels differ from `host` by rounding (0.2 level of 255 on average,
            unbiased), so runs with `device` are not bitwise those with `host`; a choice of the experiment.
    """

    def __init__(
        self,
        data_root: str,
        manifests: str = "fomo_in_flux",
        stream: str = "random_sequence_1",
        num_tasks: int = 20,
        task_boundaries: Literal["equal", "dataset"] = "equal",
        batch_size: int = 512,
        mixture: Mixture = Mixture(),
        pretraining_pool: str | None = None,
        steps_per_task: int | None = None,
        eval_datasets: list[str] | None = None,
        eval_batch_size: int = 512,
        eval_subset: SubsetRule = SubsetRule(),
        full_eval: list[EvalPoint] = ["start", "end"],  # noqa: B006 (jsonargparse needs a literal default)
        num_workers: int = 8,
        on_corrupt: OnCorrupt = "skip",
        seed: int = 0,
        synthesize_if_missing: bool = False,
        synthesize_size: Literal["quickstart", "science"] = "quickstart",
        images: ImagePipeline = "host",
    ):
        super().__init__()
        self.data_root = Path(data_root).expanduser()
        self.manifests_spec = str(Path(manifests).expanduser()) if "/" in manifests or "~" in manifests else manifests
        self.stream_spec = stream
        self.num_tasks = num_tasks
        self.task_boundaries = task_boundaries
        self.batch_size = batch_size
        self.mixture = mixture
        self.pretraining_pool = pretraining_pool
        self.steps_per_task = steps_per_task
        self.eval_dataset_names = eval_datasets
        self.eval_batch_size = eval_batch_size
        self.eval_subset = eval_subset
        self.full_eval = tuple(full_eval)
        self.num_workers = num_workers
        self.on_corrupt = on_corrupt
        self.seed = seed
        self.synthesize_if_missing = synthesize_if_missing
        self.synthesize_size = synthesize_size
        if images not in ("host", "device"):
            raise ValueError(f"data.images must be 'host' or 'device', got {images!r}")
        self.images = images
        self._device_transform: DeviceTransform | None = None
        self._warned_cpu = False
        if mixture.pretraining > 0 and not pretraining_pool:
            raise ValueError("data.mixture.pretraining > 0 needs data.pretraining_pool (a pool of the manifest set)")
        self.preprocessing: Preprocessing | None = None
        self._ready = False
        self._loaders: dict[str, list[StoppableLoader]] = {}  # the latest loaders built, by kind, for on_exception

    # ------------------------------------------------------------------ set-up

    def prepare_data(self) -> None:
        if self.synthesize_if_missing:
            from timelit.data.synth.benchmark import synthesize

            synthesize(self.data_root, size=self.synthesize_size)

    def setup(self, stage: str) -> None:
        if stage == "fit" and isinstance(self.trainer, L.Trainer):
            self._check_world_size()
        if self._ready:
            return
        self.manifest_set: ManifestSet = load_manifests(self.manifests_spec)
        self.stream: Stream = load_stream(self.stream_spec, self.manifest_set, self.num_tasks, self.task_boundaries)
        self.eval_specs: list[EvalSpec] = []
        self._train_indexes: dict[str, ShardIndex] = {}
        self._eval_indexes: dict[str, ShardIndex] = {}
        missing = []
        for name in self.stream.datasets:
            self._load_index(name, "train", self._train_indexes, missing)
        for manifest in self._eval_manifests():
            self._load_index(manifest.name, "test", self._eval_indexes, missing)
        if self.mixture.pretraining > 0:
            self._load_index(self.manifest_set.pool(self.pretraining_pool).name, "train", self._train_indexes, missing)
        self._check_shards(missing)
        for manifest in self._eval_manifests():
            index = self._eval_indexes[manifest.name]
            classes = manifest.num_classes if manifest.classnames else None
            self.eval_specs.append(
                EvalSpec(
                    name=manifest.name,
                    role=manifest.role,
                    task=manifest.task,
                    classnames=manifest.classnames,
                    prompt_templates=manifest.prompt_templates,
                    num_samples=len(index),
                    subset=self.eval_subset.select(index.label, classes),
                )
            )
        self._train_names = list(self._train_indexes)
        self._ready = True

    def _check_shards(self, missing_splits: list[str]) -> None:
        """Fail before training, in one error, when a split is not prepared or a shard that the run reads is missing
        (or short, with `on_corrupt: raise`): from the indexes and one `stat` per shard, nothing decoded
        (timelit.data.shard_sizes). Reading finds such a shard only at the first task that draws from it, hours in.
        With `on_corrupt: skip` a short shard is a warning: the samples it lost are skipped and counted."""
        missing, short = shard_size_problems([*self._train_indexes.values(), *self._eval_indexes.values()])
        fatal = missing + (short if self.on_corrupt == "raise" else [])
        if missing_splits or fatal:
            parts = []
            if missing_splits:
                parts.append(
                    f"data_root {self.data_root} lacks {len(missing_splits)} prepared split(s):\n  "
                    + "\n  ".join(missing_splits)
                )
            if fatal:
                parts.append(
                    f"{len(fatal)} shard(s) that this run reads are missing or shorter than their index says:\n  "
                    + "\n  ".join(size.describe() for size in fatal)
                )
            raise FileNotFoundError(
                "\n".join(parts)
                + "\nPrepare them with `timelit data prepare` (or `timelit data synth` for the quickstart); "
                "`timelit data verify` checks a data root."
            )
        if short and self._world()[0] == 0:
            log.warning(
                "%d shard(s) are shorter than their index says; the samples they lost will be skipped and counted "
                "(data.on_corrupt: skip):\n  %s",
                len(short),
                "\n  ".join(size.describe() for size in short),
            )

    def _check_world_size(self) -> None:
        """Fail at the start of a Trainer's `fit`, not at the first task's loader after the whole zero-shot
        evaluation: every rank takes an equal share of each global batch (the contrastive loss gathers equal shapes
        from all ranks). Evaluation alone splits datasets over any number of ranks."""
        world = self._world()[1]
        if self.batch_size % world:
            nodes, devices = getattr(self.trainer, "num_nodes", None), getattr(self.trainer, "num_devices", None)
            shape = f" ({nodes} nodes x {devices} devices)" if nodes and devices else ""
            fits = [n for n in range(1, min(self.batch_size, 64) + 1) if self.batch_size % n == 0]
            raise ValueError(
                f"data.batch_size {self.batch_size} is the global batch, split equally across ranks, but the world "
                f"size {world}{shape} does not divide it. Use a number of GPUs that divides {self.batch_size} "
                f"({', '.join(map(str, fits))}, ...) or a batch size divisible by {world}."
            )

    def _eval_manifests(self) -> list[DatasetManifest]:
        if self.eval_dataset_names is not None:
            return [self.manifest_set.dataset(name) for name in self.eval_dataset_names]
        streamed = set(self.stream.datasets)
        adapt = [m for m in self.manifest_set.by_role("adapt") if m.name in streamed]
        return adapt + self.manifest_set.by_role("eval")

    def _load_index(self, name: str, split: str, into: dict[str, ShardIndex], missing: list[str]) -> None:
        try:
            into[name] = ShardIndex.load(self.data_root / name, split)
        except FileNotFoundError:
            missing.append(f"{name}/{split}")

    def set_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Use these transforms and tokenizer instead of asking the LightningModule (for use without a Trainer)."""
        self.preprocessing = preprocessing

    def _preprocessing(self) -> Preprocessing:
        if self.preprocessing is None:
            self.preprocessing = self.trainer.lightning_module.preprocessing()  # type: ignore[union-attr]
        return self.preprocessing

    def device_transform(self) -> DeviceTransform:
        """The device half of the model's transforms (`data.images: device`), read from them once."""
        if self._device_transform is None:
            prep = self._preprocessing()
            self._device_transform = DeviceTransform.from_transforms(prep.train_transform, prep.eval_transform)
        return self._device_transform

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With `data.images: device`, resize and normalise the batch's uint8 crops on the device it was copied to
        (Lightning calls this for training and evaluation batches); host batches pass through."""
        if isinstance(batch, dict) and "image_geometry" in batch:
            if batch["image"].device.type == "cpu" and not self._warned_cpu and batch["image"].shape[1] > 64:
                self._warned_cpu = True
                log.warning(
                    "data.images=device on a CPU: the resize runs in the training process, with dense matrices "
                    "(~25 ms per 224-px sample on one core, bench/README.md section 2b); it is meant for GPUs"
                )
            batch = dict(batch)
            batch["image"] = self.device_transform().resample(batch["image"], batch.pop("image_geometry"))
        return batch

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    # ------------------------------------------------------------------ training

    def _candidates(self, task: int) -> np.ndarray:
        """Sample ids of every training sample of the concepts of `task`."""
        parts = []
        for name, labels in self.stream.labels[task].items():
            index = self._train_indexes[name]
            positions = np.flatnonzero(np.isin(index.label, np.fromiter(labels, dtype=np.int32)))
            if len(positions) == 0:
                raise ValueError(f"task {task}: dataset {name} has no training samples of labels {sorted(labels)[:10]}")
            parts.append(encode(self._train_names.index(name), positions))
        return np.concatenate(parts)

    def counts(self, task: int) -> dict[str, int]:
        """Samples per source in a global batch of `task`."""
        return source_counts(self.batch_size, self.mixture, first_task=task == 0)

    def set_steps_per_task(self, steps: int) -> None:
        """Called by ComputeBudget in its setup, before the first training loader: the steps its budget buys."""
        if steps < 1:
            raise ValueError(f"steps per task must be at least 1, got {steps}")
        self.steps_per_task = steps

    def require_steps(self) -> int:
        if self.steps_per_task is None:
            raise ValueError(
                "data.steps_per_task is not set: set it, or add a ComputeBudget callback (the `budget:` section of the "
                "config) that derives it from a GFLOP budget"
            )
        if self.steps_per_task < 1:
            raise ValueError(f"data.steps_per_task must be at least 1, got {self.steps_per_task}")
        return self.steps_per_task

    def task_batches(self, task: int) -> TaskBatches:
        """The training batches of `task` for this rank (usable without a Trainer)."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(
                f"task {task} is outside the stream of {self.num_tasks} tasks; trainer.max_epochs must equal "
                f"data.num_tasks"
            )
        steps = self.require_steps()
        rank, world = self._world()
        counts = self.counts(task)
        slices = rank_slices(counts, world, rank)
        parts = []
        for source in ("current", "replay", "pretraining"):
            if counts[source] == 0:
                continue
            if source == "pretraining":
                pool = self._train_names.index(self.manifest_set.pool(self.pretraining_pool).name)
                candidates = encode(pool, np.arange(len(self._train_indexes[self._train_names[pool]])))
                sequence = SourceSequence(candidates, self.seed, -1, source)
                start = pool_offsets([self.counts(t)["pretraining"] for t in range(task + 1)], steps)[task]
            else:
                tasks = [task] if source == "current" else list(range(task))
                sequence = SourceSequence(np.concatenate([self._candidates(t) for t in tasks]), self.seed, task, source)
                start = 0
            offset, count = slices[source]
            parts.append(SourcePart(source, sequence, start, counts[source], offset, count))
        indexes = [self._train_indexes[name] for name in self._train_names]
        prep = self._preprocessing()
        tokenizer = CachedTokenizer(prep.tokenizer)  # exact: a task draws the same captions many times
        if self.images == "device":
            device = self.device_transform()
            reader = SampleReader(indexes, self.on_corrupt, decode_pixels)
            return TaskBatches(task, steps, parts, reader, device.train_region, tokenizer, self.seed, collate_regions)
        reader = SampleReader(indexes, self.on_corrupt)
        return TaskBatches(task, steps, parts, reader, prep.train_transform, tokenizer, self.seed)

    def train_dataloader(self) -> TaskLoader:
        task = self.trainer.current_epoch  # type: ignore[union-attr]
        batches = self.task_batches(task)
        log.info("task %d: %d steps, batch mix %s", task, batches.steps, self.counts(task))
        loader = TaskLoader(batches, **loader_kwargs(self.num_workers))
        self._loaders["train"] = [loader]
        return loader

    # ------------------------------------------------------------------ evaluation

    def eval_scope(self) -> Literal["subset", "full"]:
        """Full test splits before the stream (the sanity check is the zero-shot evaluation) and after the last
        task, as configured by `full_eval`; the fixed subsets otherwise."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return "full"  # `timelit validate` / `test`: the whole test split
        if trainer.sanity_checking and "start" in self.full_eval:
            return "full"
        if trainer.current_epoch == self.num_tasks - 1 and "end" in self.full_eval:
            return "full"
        return "subset"

    def eval_batches(self, spec: EvalSpec, scope: Literal["subset", "full"] = "subset") -> EvalBatches:
        """This rank's share of one evaluation dataset (usable without a Trainer)."""
        rank, world = self._world()
        positions = {"subset": spec.subset[rank::world], "full": np.arange(spec.num_samples)[rank::world]}
        prep = self._preprocessing()
        index, batch = self._eval_indexes[spec.name], self.eval_batch_size
        if self.images == "device":
            device = self.device_transform()
            return EvalBatches(
                spec.name, spec.task, index, positions, batch, device.eval_region, prep.tokenizer, self.on_corrupt,
                scope, image_decoder=decode_pixels, collate=collate_regions,
            )  # fmt: skip
        return EvalBatches(
            spec.name, spec.task, index, positions, batch, prep.eval_transform, prep.tokenizer, self.on_corrupt, scope
        )

    def val_dataloader(self) -> list[EvalLoader]:
        # The scope is chosen now (Lightning sizes the loop by the loader's length) and again when the loader is
        # iterated (Lightning reuses the sanity check's loaders for the first task, which then shrink to the subset).
        scope = self.eval_scope()
        loaders = []
        for spec in self.eval_specs:
            batches = self.eval_batches(spec, scope)
            workers = eval_workers(self.num_workers, batches.most_batches)
            loaders.append(EvalLoader(batches, self.eval_scope, **loader_kwargs(workers)))
        self._loaders["eval"] = list(loaders)
        return loaders

    def test_dataloader(self) -> list:
        return self.val_dataloader()

    # ------------------------------------------------------------------ errors

    def on_exception(self, exception: BaseException) -> None:
        """Stop the loader workers on the error path of `fit`, `validate` and `test` (Lightning calls this after the
        callbacks' `on_exception`), so that the process can exit.

        Without this a failed run never ends: the iterator that owns the workers stays referenced by the exception's
        traceback, so nothing stops them, and at exit Python's multiprocessing handler sends them SIGTERM, which they
        ignore for preemption (`timelit.data.loaders.ignore_preemption_signals`), then joins them while they wait for
        their parent. Issue 20: a missing shard, or a full disk at a checkpoint, held a job until its time limit.
        """
        for loaders in self._loaders.values():
            for loader in loaders:
                loader.shutdown_workers()
