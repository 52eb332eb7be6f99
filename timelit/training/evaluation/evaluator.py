"""ZeroShotEvaluator: per-dataset zero-shot figures of the deployed model, identical on every DDP rank.

Each rank evaluates its own share of every dataset (no sample twice, none dropped) and records, per sample, what the
figures need: the rank of the true class for classification, the image and caption embeddings for retrieval. The
records are torchmetrics states reduced by concatenation, so `compute()` sees every sample on every rank. Figures are
computed on the fixed subset and, when the loaders served the full test split, on all of it as well (the subset is
part of the full split, so one pass gives both).

Samples that did not decode (`data.on_corrupt: skip`) are recorded by position as well, so every figure comes with
`skipped`, the samples of its scope left out of it, beside `n`, the samples in it: an accuracy over 80 of 100 images
is not the accuracy over 100.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from timelit.training.evaluation.zero_shot import (
    classification_head,
    recall_at_k,
    text_tower_fingerprint,
    true_class_rank,
)

Scope = Literal["subset", "full"]


class _Records(Metric):
    """Concatenated per-sample tensors, gathered from every rank on `compute()`."""

    full_state_update = False

    def __init__(self, fields: tuple[str, ...]):
        super().__init__()
        self.fields = fields
        for name in fields:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, **values: torch.Tensor) -> None:  # type: ignore[override]
        for name in self.fields:
            getattr(self, name).append(values[name])

    def compute(self) -> dict[str, torch.Tensor]:
        return {name: dim_zero_cat(getattr(self, name)) for name in self.fields}


class ZeroShotEvaluator(nn.Module):
    """Builds prompt heads, collects per-sample records and turns them into per-dataset figures."""

    def __init__(self) -> None:
        super().__init__()
        self.records = nn.ModuleList()
        self.skipped = nn.ModuleList()  # per dataset: positions of the samples that did not decode
        self.specs: list[Any] = []
        self._heads: dict[str, torch.Tensor] = {}
        self._fingerprint: str | None = None
        self._head_key: tuple[Any, ...] = ()
        self.head_builds = 0

    def configure(self, specs: list[Any]) -> None:
        """One record set per evaluation dataset (`EvalSpec`s from the data module), in loader order.

        The heads cached by `prepare` depend on the specs as much as on the text tower: when the datasets, class
        names or templates change, the cache is dropped, or unchanged weights would keep serving the old heads.
        """
        head_key = _head_key(specs)
        if head_key != self._head_key:
            self._heads, self._fingerprint, self._head_key = {}, None, head_key
        self.specs = list(specs)
        self.records = nn.ModuleList(
            _Records(("position", "rank"))
            if spec.task == "classification"
            else _Records(("position", "image", "caption_owner", "caption"))
            for spec in self.specs
        )
        self.skipped = nn.ModuleList(_Records(("position",)) for _ in self.specs)

    @torch.no_grad()
    def prepare(self, model: nn.Module, tokenizer, device: torch.device) -> None:
        """Build the classification heads, unless the text tower is unchanged since they were last built."""
        fingerprint = text_tower_fingerprint(model)
        if fingerprint == self._fingerprint:
            return
        self._heads = {
            spec.name: classification_head(model, tokenizer, spec.classnames, spec.prompt_templates, device)
            for spec in self.specs
            if spec.task == "classification"
        }
        self._fingerprint = fingerprint
        self.head_builds += 1

    @torch.no_grad()
    def update(self, dataloader_idx: int, model: nn.Module, batch: dict[str, Any]) -> None:
        spec, records = self.specs[dataloader_idx], self.records[dataloader_idx]
        skipped = batch.get("skipped") or []
        if skipped:
            lost = torch.tensor([skip.position for skip in skipped], dtype=torch.long, device=batch["position"].device)
            self.skipped[dataloader_idx].update(position=lost)
        if batch["position"].numel() == 0:
            return
        images = F.normalize(model.encode_image(batch["image"]).float(), dim=-1)
        if spec.task == "classification":
            _check_labels(spec, batch)
            head = self._heads[spec.name].to(images.device)
            records.update(position=batch["position"], rank=true_class_rank(images @ head.T, batch["label"]))
        else:
            captions = F.normalize(model.encode_text(batch["caption_tokens"]).float(), dim=-1)
            records.update(
                position=batch["position"], image=images, caption_owner=batch["caption_owner"], caption=captions
            )

    def _touch(self, device: torch.device, embed_dim: int) -> None:
        """Give every record set a correctly shaped entry, so ranks that saw no sample of a dataset still gather."""
        empty_long = torch.empty(0, dtype=torch.long, device=device)
        empty_feat = torch.empty(0, embed_dim, device=device)
        for skipped in self.skipped:
            skipped.update(position=empty_long)
        for spec, records in zip(self.specs, self.records):
            if spec.task == "classification":
                records.update(position=empty_long, rank=empty_long)
            else:
                records.update(position=empty_long, image=empty_feat, caption_owner=empty_long, caption=empty_feat)

    def compute(self, scope: Scope, device: torch.device, embed_dim: int) -> dict[str, dict[str, Any]]:
        """Figures per dataset: `{"subset": {...}}`, plus `"full"` when the loaders served full test splits."""
        self._touch(device, embed_dim)
        results = {}
        for spec, records, skipped in zip(self.specs, self.records, self.skipped):
            gathered = records.compute()
            lost = torch.unique(skipped.compute()["position"])
            entry: dict[str, Any] = {"role": spec.role, "task": spec.task}
            subset = torch.as_tensor(np.asarray(spec.subset), device=device)
            keep = torch.isin(gathered["position"], subset)
            entry["subset"] = {**self._figures(spec, gathered, keep), "skipped": int(torch.isin(lost, subset).sum())}
            if scope == "full":
                entry["full"] = {**self._figures(spec, gathered, torch.ones_like(keep)), "skipped": len(lost)}
            results[spec.name] = entry
        self.reset()
        return results

    @staticmethod
    def _figures(spec: Any, gathered: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
        if spec.task == "classification":
            rank = gathered["rank"][keep]
            figures = {"top1": 100.0 * (rank < 1).float().mean().item() if len(rank) else float("nan"), "n": len(rank)}
            if len(spec.classnames) > 5:
                figures["top5"] = 100.0 * (rank < 5).float().mean().item() if len(rank) else float("nan")
            return figures
        positions = gathered["position"][keep]
        images = gathered["image"][keep]
        owner_kept = torch.isin(gathered["caption_owner"], positions)
        # captions point at their image by dataset position; re-index them to rows of `images`
        row_of = {int(p): row for row, p in enumerate(positions.tolist())}
        owners = torch.tensor(
            [row_of[int(p)] for p in gathered["caption_owner"][owner_kept].tolist()],
            dtype=torch.long,
            device=images.device,
        )
        figures = recall_at_k(images, gathered["caption"][owner_kept], owners)
        figures["R@5"] = (figures["i2t_R@5"] + figures["t2i_R@5"]) / 2
        figures["n"] = len(positions)
        return figures

    def reset(self) -> None:
        for records in [*self.records, *self.skipped]:
            records.reset()


def _head_key(specs: list[Any]) -> tuple[Any, ...]:
    """What the classification heads are built from, per dataset."""
    return tuple(
        (spec.name, tuple(spec.classnames), tuple(spec.prompt_templates))
        for spec in specs
        if spec.task == "classification"
    )


def _check_labels(spec: Any, batch: dict[str, Any]) -> None:
    """Labels must index the class list: an out-of-range one would fail inside `gather` without naming the dataset
    (the loader already rejects a missing or negative label, naming the sample key)."""
    labels, num_classes = batch["label"], len(spec.classnames)
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        positions = batch["position"][bad].tolist()[:5]
        raise ValueError(
            f"evaluation dataset '{spec.name}': label(s) {sorted(set(labels[bad].tolist()))} at dataset position(s) "
            f"{positions} are outside 0..{num_classes - 1}, the indices of its {num_classes}-name class list; the "
            f"shards do not match the manifest (`timelit data verify` lists such labels)"
        )


def summary_figure(entry: dict[str, Any], scope: Scope = "subset") -> float:
    """The one number a dataset contributes to A_KA / A_ZS: top-1 accuracy, or mean R@5 for retrieval."""
    figures = entry[scope]
    return figures["top1"] if entry["task"] == "classification" else figures["R@5"]
