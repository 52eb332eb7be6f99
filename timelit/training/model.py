"""CLIPFineTuner: an open_clip model trained with the symmetric contrastive loss, task after task.

    timelit fit --config quickstart.yaml

One training step is: encode the batch's images and captions, compute open_clip's `ClipLoss` over the global batch
(features are all-gathered across ranks, with gradients), step AdamW under the per-task cosine schedule. At the start
of every task the AdamW moments are cleared, as the reference pipeline re-creates its optimizer per task. Evaluation
runs the zero-shot evaluator over one loader per dataset; what it computes is handed to the callbacks through
`last_evaluation` (the TaskResults callback records it).

On a GPU (README, "On a GPU"): `compile` compiles both towers with torch.compile, `grad_checkpointing` recomputes
the transformer blocks' activations in the backward pass (open_clip's `set_grad_checkpointing`), and `micro_batches`
computes the global batch's step in k slices (`_features`). None of them changes what a step computes, only its
memory and speed, so the budget, the step counts and checkpoints are the same with and without them.

Checkpoint layout: `state_dict` holds the live training weights under `model.`; the zero-shot weights θ0 are not in
it: they are rebuilt from `pretrained` in `setup` (docs/ARCHITECTURE.md decision 6: the base weights are immutable).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from open_clip.loss import ClipLoss
from torch.utils.checkpoint import checkpoint

from timelit.data.datamodule import Preprocessing
from timelit.training.clip import build_clip, load_pretrained
from timelit.training.contracts import EvaluationSets, TrainingBatches, datamodule_as
from timelit.training.evaluation.evaluator import ZeroShotEvaluator
from timelit.training.lightning_internals import reaches_logger
from timelit.training.optim import TaskCosineSchedule, parameter_groups
from timelit.training.seeding import mix_seed, seed_step

log = logging.getLogger(__name__)


class CLIPFineTuner(L.LightningModule):
    """Fine-tunes an open_clip CLIP over a stream of tasks.

    Args:
        model_name: an open_clip architecture (`ViT-B-16`, ...) or a timelit tiny one (`timelit-tiny-ViT`).
        pretrained: an open_clip pretrained tag (`laion2b_s34b_b88k`), a weights file (safetensors, torch or a timelit
            checkpoint), or null for random initialisation.
        lr: AdamW learning rate at the end of warm-up (reference: 1e-5).
        weight_decay: AdamW weight decay (reference: 0.2).
        betas: AdamW betas.
        eps: AdamW epsilon.
        decay_norms_and_biases: also decay gains, biases and `logit_scale` (the reference pipeline does; open_clip
            does not).
        warmup_fraction: share of each task spent in linear warm-up (reference: 0.1).
        min_lr_ratio: the cosine decays to this fraction of `lr` at the end of each task (reference: 0.001).
        fused: AdamW's fused kernel, one pass over every parameter (on a CPU torch's default runs a loop of small
            kernels per tensor: the quickstart's optimizer step took 53 ms instead of 6). null: fused except under
            mixed precision (16-mixed, bf16-mixed), where Lightning refuses to clip the gradients of an optimizer
            that can unscale them itself; there torch's default applies (a multi-tensor `foreach` step on CUDA).
        seed: re-seeds the random generators at every step from (seed, rank, step), so a resumed run draws exactly
            what an uninterrupted one does (linked to `seed_everything` by the CLI).
        micro_batches: split each rank's share of the global batch into this many equal slices whose activations
            are held one at a time (gradient accumulation that keeps the contrastive loss over the whole batch; see
            `_features`); the rank's share (`data.batch_size` / world size) must be divisible by it. Costs one more
            forward pass per step.
        grad_checkpointing: recompute the activations of every transformer block in the backward pass instead of
            storing them (open_clip's `set_grad_checkpointing`, both towers): less memory, one more forward pass.
        compile: compile the image and text towers with `torch.compile` (each tower's module in place, so weight
            names, checkpoints and the weights TimeMerge swaps in are unchanged, and a swap does not recompile).
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = "laion2b_s34b_b88k",
        lr: float = 1e-5,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        decay_norms_and_biases: bool = False,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.001,
        fused: bool | None = None,
        seed: int = 0,
        micro_batches: int = 1,
        grad_checkpointing: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"model.micro_batches must be a positive integer, got {micro_batches!r}")
        self.save_hyperparameters()
        bundle = build_clip(model_name)
        self.model = bundle.model
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if compile:
            # In place (nn.Module.compile): the state_dict keeps its names (no `_orig_mod.`), so checkpoints, the
            # EMA and TimeMerge's load_state_dict see the same model; a weight swap copies into the same tensors.
            self.model.visual.compile()
            self.model.transformer.compile()
        self._preprocessing = Preprocessing(bundle.train_transform, bundle.eval_transform, bundle.tokenizer)
        self.evaluator = ZeroShotEvaluator()
        self.zero_shot_weights: dict[str, torch.Tensor] | None = None
        self.last_evaluation: dict[str, Any] | None = None
        self.optimizer_task = -1
        self.loss_fn: ClipLoss | None = None

    # ------------------------------------------------------------------ set-up

    def preprocessing(self) -> Preprocessing:
        """The transforms and tokenizer that belong to this model (the data module applies them in its workers)."""
        return self._preprocessing

    def setup(self, stage: str) -> None:
        if self.zero_shot_weights is None:
            if self.hparams.pretrained:
                load_pretrained(self.model, self.hparams.model_name, self.hparams.pretrained)
            # θ0 is captured before any checkpoint is restored, so a resumed run has the same base weights.
            self.zero_shot_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        sets = datamodule_as(self.trainer, EvaluationSets)
        if sets is not None:
            self.evaluator.configure(sets.eval_specs)
        if stage == "fit":
            self._check_micro_batches(datamodule_as(self.trainer, TrainingBatches))
        self.loss_fn = ClipLoss(
            local_loss=False,
            gather_with_grad=True,
            cache_labels=True,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
        )

    def _check_micro_batches(self, batches: TrainingBatches | None) -> None:
        """Refuse, before the zero-shot evaluation, a split that would change the batch or the step count."""
        if self.trainer.accumulate_grad_batches != 1:
            # Lightning's accumulation computes a loss per micro-batch, each with only its own samples as negatives,
            # and counts every micro-batch as a batch: the contrastive objective, the budget's steps per task (one
            # loader batch per step) and the per-step schedule, EMA and checkpoints would all change.
            raise ValueError(
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} is not supported: it "
                f"changes the contrastive loss and the steps per task; set model.micro_batches instead"
            )
        if batches is None:
            return
        batch_size, world = batches.batch_size, self.trainer.world_size
        if (batch_size // world) % self.hparams.micro_batches:
            raise ValueError(
                f"model.micro_batches={self.hparams.micro_batches} does not divide each rank's batch of "
                f"{batch_size // world} (data.batch_size {batch_size} over {world} rank(s)); choose a divisor of "
                f"{batch_size // world}"
            )

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    def configure_optimizers(self) -> dict[str, Any]:
        batches = datamodule_as(self.trainer, TrainingBatches)
        if batches is None:
            raise ValueError(
                "CLIPFineTuner needs a data module of task batches (timelit.training.contracts.TrainingBatches)"
            )
        steps = batches.require_steps()
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, hp.weight_decay, hp.decay_norms_and_biases),
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
            fused=self._fused(),
        )
        schedule = TaskCosineSchedule(optimizer, steps, hp.warmup_fraction, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _fused(self) -> bool | None:
        if self.hparams.fused is not None:
            return bool(self.hparams.fused)
        from lightning.pytorch.plugins.precision import MixedPrecision

        return None if isinstance(self.trainer.precision_plugin, MixedPrecision) else True

    # ------------------------------------------------------------------ training

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # A new task starts with fresh AdamW moments. Decided per step from a checkpointed marker, not in
        # `on_train_epoch_start`, which Lightning skips after some resumes; a resume mid-task keeps its moments.
        if self.optimizer_task != self.current_epoch:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()
            self.optimizer_task = self.current_epoch
        seed_step(mix_seed(self.hparams.seed, self.global_rank, self.global_step))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image_features, text_features, logit_scale = self._features(batch["image"], batch["text"])
        loss = self.loss_fn(image_features, text_features, logit_scale)
        # Only at the steps that reach the logger, the loss included: the progress bar shows the last logged value.
        # A value logged with prog_bar is read back to the host at every step it is logged (a GPU sync), and each
        # `log` call costs ~0.5 ms of bookkeeping (bench/README.md, section 1).
        if reaches_logger(self.trainer):
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/logit_scale", logit_scale.detach())
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def _features(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image features, text features and logit scale of the batch, computed in `micro_batches` slices.

        The contrastive loss is not a sum over micro-batches: every sample's negatives are the whole global batch.
        So this is not Lightning's accumulation (one loss and backward per micro-batch) but GradCache's (Gao et al.,
        arXiv 2101.06983), which open_clip's `--accum-freq` also implements: the features of all slices enter one
        loss, and each slice's forward runs under activation checkpointing, so only its input is kept; the backward
        pass recomputes one slice at a time and its gradients add up in `.grad`. The step is then the unsplit
        batch's step (to float rounding), one Lightning step, one optimizer step and one loader batch as before:
        the budget, StepEMA, the schedule and resume count steps exactly as without micro-batches.
        """
        k = self.hparams.micro_batches
        if k == 1:
            return self.model(image, text)[:3]
        if image.shape[0] % k:
            raise ValueError(f"model.micro_batches={k} does not divide this rank's batch of {image.shape[0]}")
        parts = [checkpoint(self._encode, i, t, use_reentrant=False) for i, t in zip(image.chunk(k), text.chunk(k))]
        return (
            torch.cat([p[0] for p in parts]),
            torch.cat([p[1] for p in parts]),
            self.model.logit_scale.exp(),
        )

    def _encode(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(image, normalize=True), self.model.encode_text(text, normalize=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["timelit_optimizer_task"] = self.optimizer_task

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer_task = int(checkpoint.get("timelit_optimizer_task", -1))

    # ------------------------------------------------------------------ evaluation

    def on_validation_epoch_start(self) -> None:
        with self.trainer.precision_plugin.forward_context():
            self.evaluator.prepare(self.model, self._preprocessing.tokenizer, self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.update(dataloader_idx, self.model, batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation(self.trainer.val_dataloaders)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        # `trainer.test()` leaves `val_dataloaders` unset: the scope must be read from the loaders that were run.
        self._finish_evaluation(self.trainer.test_dataloaders)

    def _finish_evaluation(self, loaders: Any) -> None:
        """Compute the figures of the evaluation just run and hand them to the callbacks in `last_evaluation`.

        The scope is `full` only if every loader served its full split (a loader without a scope, e.g. a plain
        DataLoader in a test, counts as full), since only then are full-split figures meaningful.
        """
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        scopes = {getattr(loader.dataset, "scope", "full") for loader in loaders}
        scope = "full" if scopes == {"full"} else "subset"
        self.last_evaluation = {"scope": scope, "datasets": self.evaluator.compute(scope, self.device, self.embed_dim)}
