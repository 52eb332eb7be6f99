"""GFLOPs of one training step, counted by torch's FLOP counter on the meta device, and the budget arithmetic.

    timelit budget --model_name ViT-B-16 --batch_size 512 --total_gflops 1.8e9 --num_tasks 20

One step as FoMo-in-Flux's `flops_computation.py` measures it: the open_clip model encodes `batch_size` images and
captions, open_clip's `ClipLoss` (as in `CLIPFineTuner.training_step`) scores the B x B similarities, and the loss
is back-propagated, inside `torch.utils.flop_counter.FlopCounterMode`. Matrix products, convolutions and attention
count (2 FLOPs per multiply-add); element-wise work does not, as in the reference. The model is built on the meta
device, so counting costs no memory and no arithmetic (ViT-B-16 at batch 512: about two seconds of Python).

`attention="fused"` (default) counts attention as the GPU's fused kernels run it, whose backward recomputes the
scores (the reference's count: 63,395.56 GFLOPs per ViT-B-16 step at batch 512, reference 63,394.76); `"math"`
counts the unfused path the meta device has (62,992.01). A `multiplier` charges memory-adjusted FLOPs for a method
that trains fewer parameters (1 for full fine-tuning). docs/ARCHITECTURE.md ("The compute budget") has the details.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timelit.utilities.errors import UserError

log = logging.getLogger(__name__)

AttentionCount = Literal["fused", "math"]
Rounding = Literal["nearest", "floor"]


class BudgetError(UserError, ValueError):
    """A compute-budget setting that cannot work (a budget that is not positive or buys less than one step, a batch
    size under 1, a budget that contradicts data.steps_per_task or the run being resumed); the message names it."""


@dataclass(frozen=True)
class StepCost:
    """The measured cost of one training step (forward and backward) on one global batch."""

    model_name: str
    batch_size: int
    image_size: tuple[int, int]
    context_length: int
    attention: AttentionCount
    forward_gflops: float
    gflops: float
    by_op: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def backward_gflops(self) -> float:
        return self.gflops - self.forward_gflops

    @property
    def gflops_per_sample(self) -> float:
        return self.gflops / self.batch_size


def _fused_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`scaled_dot_product_attention` as the memory-efficient fused kernel a GPU runs (meta tensors only)."""
    needs_grad = query.requires_grad or key.requires_grad or value.requires_grad
    output = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale
    )
    return output[0]


@contextmanager
def _attention_counted_as(attention: AttentionCount) -> Iterator[None]:
    """While counting, run attention as the fused kernel (see the module docstring).

    `nn.MultiheadAttention` (open_clip's attention) calls `scaled_dot_product_attention` by its global name inside
    `torch.nn.functional`, out of reach of a TorchFunctionMode (a mode is switched off while its handler runs the
    outer `multi_head_attention_forward`), so the name is swapped for the duration of the count and restored.
    """
    if attention == "math":
        yield
        return
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def build_meta_model(model_name: str) -> torch.nn.Module:
    """The open_clip architecture `model_name` with every tensor on the meta device (shapes only, no storage)."""
    from timelit.training.clip import build_clip

    with torch.device("meta"):
        return build_clip(model_name, device="meta").model


def model_input_shape(model: torch.nn.Module) -> tuple[tuple[int, int], int]:
    """(image height and width, text context length) the model was configured with."""
    size = model.visual.image_size
    image_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    context_length = getattr(model, "context_length", None) or model.text.context_length
    return image_size, int(context_length)


def measure_step(model_name: str, batch_size: int, attention: AttentionCount = "fused") -> StepCost:
    """Count the FLOPs of one training step of open_clip `model_name` on a global batch of `batch_size` pairs.

    The step mirrors `CLIPFineTuner.training_step`: `model(images, texts)`, open_clip's `ClipLoss` over the whole
    global batch, then `loss.backward()`. Under DDP every rank computes the B x B logits of its own rows against all
    gathered features, so the loss is spread over ranks; counting it once for the global batch is what the
    reference does (it trains on one GPU).
    """
    from open_clip.loss import ClipLoss

    if batch_size < 1:
        raise BudgetError(f"batch_size must be at least 1, got {batch_size}")
    if attention not in ("fused", "math"):
        raise BudgetError(f"attention must be 'fused' or 'math', got {attention!r}")
    model = build_meta_model(model_name)
    model.train()
    image_size, context_length = model_input_shape(model)
    images = torch.empty(batch_size, 3, *image_size, device="meta")
    texts = torch.zeros(batch_size, context_length, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with _attention_counted_as(attention), counter:
        image_features, text_features, logit_scale = model(images, texts)[:3]
        loss = ClipLoss()(image_features, text_features, logit_scale)
        forward = counter.get_total_flops()
        loss.backward()
    total = counter.get_total_flops()
    by_op = {str(op): flops / 1e9 for op, flops in counter.get_flop_counts().get("Global", {}).items()}
    return StepCost(model_name, batch_size, image_size, context_length, attention, forward / 1e9, total / 1e9, by_op)


def steps_for_budget(gflops_per_task: float, gflops_per_step: float, rounding: Rounding = "nearest") -> int:
    """Training steps one task's budget buys.

    `"nearest"` reproduces the reference table: its 1.8e9 GFLOPs is 20 x 1420 x 63,394.76 = 1.80041e9 rounded to
    two digits, so flooring the rounded figure falls one step short in every row (1419 / 567 / 283 / 141 for
    T = 20 / 50 / 100 / 200) while the nearest whole step gives 1420 / 568 / 284 / 142. It may spend up to half a
    step more than the budget; `"floor"` never exceeds it. A budget smaller than one step is refused either way.
    """
    if gflops_per_step <= 0:
        raise ValueError(f"GFLOPs per step must be positive, got {gflops_per_step}")
    if gflops_per_task < gflops_per_step:
        raise ValueError(
            f"a task's budget of {gflops_per_task:,.6g} GFLOPs is smaller than one training step "
            f"({gflops_per_step:,.6g} GFLOPs)"
        )
    ratio = gflops_per_task / gflops_per_step
    return math.floor(ratio + 0.5) if rounding == "nearest" else math.floor(ratio)
