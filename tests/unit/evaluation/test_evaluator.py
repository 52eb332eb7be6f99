"""ZeroShotEvaluator on synthetic features: subset and full figures, retrieval re-indexing, head caching.

python -m pytest tests/unit/evaluation/test_evaluator.py -q
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from timelit.data.skips import Skip
from timelit.training.clip import build_clip
from timelit.training.evaluation.evaluator import ZeroShotEvaluator
from timelit.training.evaluation.metrics import summarize

CPU = torch.device("cpu")
DIM = 6
CLASSES = tuple(f"c{i}" for i in range(DIM))


class Identity(nn.Module):
    """A stand-in CLIP whose 'images' and 'tokens' are already their features; class name c<i> embeds as e_i."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float()


def one_hot_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.eye(DIM)[[int(text[1:]) for text in texts]]


def padded(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.pad(torch.tensor(rows), (0, DIM - len(rows[0])))


# Classification (6 classes, so top-5 is reported). Ranks of the true class: 0, 5, 1, 0, 1.
CLS_IMAGES = padded(
    [
        [1.0, 0.2, 0.0, 0.0, 0.0, 0.0],  # label 0: best
        [0.1, 1.0, 0.5, 0.4, 0.3, 0.0],  # label 5: five classes score higher
        [0.0, 0.5, 1.0, 0.0, 0.0, 0.0],  # label 1: one higher
        [0.3, 0.2, 0.9, 0.0, 0.0, 0.0],  # label 2: best
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 1: one higher
    ]
)
CLS_LABELS = torch.tensor([0, 5, 1, 2, 1])
CLS_SUBSET = np.array([0, 2, 3])

# Retrieval: three images, captions a, b (image 0), c (image 1), d, e (image 2); the subset drops image 1.
RET_IMAGES = padded([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
RET_CAPTIONS = padded([[0.6, 0.8, 0.0], [0.0, 0.8, 0.6], [0.8, 0.6, 0.0], [0.8, 0.0, 0.6], [0.0, 0.0, 1.0]])
RET_OWNERS = torch.tensor([0, 0, 1, 2, 2])  # dataset positions of the captions' images
RET_SUBSET = np.array([0, 2])


def specs() -> list[SimpleNamespace]:
    return [
        SimpleNamespace(name="CLS", role="adapt", task="classification", classnames=CLASSES,
                        prompt_templates=("{}",), num_samples=5, subset=CLS_SUBSET),
        SimpleNamespace(name="RET", role="eval", task="retrieval", classnames=(), prompt_templates=(),
                        num_samples=3, subset=RET_SUBSET),
    ]  # fmt: skip


def new_evaluator() -> ZeroShotEvaluator:
    evaluator = ZeroShotEvaluator()
    evaluator.configure(specs())
    evaluator.prepare(Identity(), one_hot_tokenizer, CPU)
    return evaluator


def feed(evaluator: ZeroShotEvaluator) -> None:
    """Every sample of both datasets, in batches as a loader would serve them."""
    model = Identity()
    for chunk in (slice(0, 2), slice(2, 5)):
        positions = torch.arange(5)[chunk]
        batch = {"image": CLS_IMAGES[chunk], "label": CLS_LABELS[chunk], "position": positions}
        evaluator.update(0, model, batch)
    for chunk in (slice(0, 1), slice(1, 3)):
        positions = torch.arange(3)[chunk]
        owned = torch.isin(RET_OWNERS, positions)
        batch = {"image": RET_IMAGES[chunk], "position": positions,
                 "caption_tokens": RET_CAPTIONS[owned], "caption_owner": RET_OWNERS[owned]}  # fmt: skip
        evaluator.update(1, model, batch)


def evaluate(scope: str) -> dict:
    evaluator = new_evaluator()
    feed(evaluator)
    return evaluator.compute(scope, CPU, DIM)


def test_subset_scope_evaluates_only_the_fixed_subset():
    results = evaluate("subset")
    assert "full" not in results["CLS"] and "full" not in results["RET"]
    assert results["CLS"]["subset"] == pytest.approx({"top1": 200 / 3, "top5": 100.0, "n": 3, "skipped": 0})
    # Subset images 0 and 2 with captions a, b, d, e. i2t: image 0's best own caption (0.6) is beaten by d (0.8),
    # image 2's (1.0) by nothing. t2i: a and e find their image first; b (0 < 0.6) and d (0.6 < 0.8) second.
    retrieval = results["RET"]["subset"]
    assert retrieval["i2t_R@1"] == pytest.approx(50.0) and retrieval["t2i_R@1"] == pytest.approx(50.0)
    assert retrieval["R@5"] == pytest.approx((retrieval["i2t_R@5"] + retrieval["t2i_R@5"]) / 2)
    assert retrieval["n"] == 2


def test_full_scope_gives_full_and_subset_figures_from_one_pass():
    results = evaluate("full")
    assert results["CLS"]["full"] == pytest.approx({"top1": 40.0, "top5": 80.0, "n": 5, "skipped": 0})
    assert results["CLS"]["subset"] == pytest.approx({"top1": 200 / 3, "top5": 100.0, "n": 3, "skipped": 0})
    # All three images and five captions: i2t ranks 2, 2, 0; t2i ranks 1, 2, 1, 1, 0.
    full = results["RET"]["full"]
    assert (full["i2t_R@1"], full["t2i_R@1"], full["n"]) == pytest.approx((100 / 3, 20.0, 3))
    assert full["i2t_R@5"] == full["t2i_R@5"] == full["R@5"] == 100.0
    assert results["RET"]["subset"]["n"] == 2
    assert (results["CLS"]["role"], results["RET"]["role"]) == ("adapt", "eval")


def test_samples_that_did_not_decode_are_counted_in_the_scope_they_belong_to():
    """Positions 1 and 3 of CLS do not decode (3 is in the subset); a batch of RET loses its only sample."""
    evaluator, model = new_evaluator(), Identity()
    lost = [Skip("CLS", "test", "test-000000.tar", p, "image does not decode", None) for p in (1, 3)]
    kept = torch.tensor([0, 2, 4])
    batch = {"image": CLS_IMAGES[kept], "label": CLS_LABELS[kept], "position": kept, "skipped": lost}
    evaluator.update(0, model, batch)
    empty = {"image": torch.empty(0), "position": torch.empty(0, dtype=torch.long), "caption_tokens": torch.empty(0),
             "caption_owner": torch.empty(0, dtype=torch.long)}  # fmt: skip
    evaluator.update(1, model, {**empty, "skipped": [Skip("RET", "test", "test-000000.tar", 1, "ends early", None)]})
    results = evaluator.compute("full", CPU, DIM)
    assert (results["CLS"]["full"]["n"], results["CLS"]["full"]["skipped"]) == (3, 2)
    assert (results["CLS"]["subset"]["n"], results["CLS"]["subset"]["skipped"]) == (2, 1)  # ranks 0, 1 of 0, 2
    assert results["CLS"]["subset"]["top1"] == pytest.approx(50.0)
    assert results["RET"]["full"]["skipped"] == 1 and results["RET"]["subset"]["skipped"] == 0  # 1 is not in it


def test_results_feed_the_summary():
    results = evaluate("full")
    assert summarize(results, "full") == pytest.approx({"A_KA": 40.0, "A_ZS": 100.0, "GM": 20.0 * 10**0.5})


def test_each_evaluation_starts_from_empty_records():
    evaluator = new_evaluator()
    feed(evaluator)
    first = evaluator.compute("full", CPU, DIM)
    feed(evaluator)
    second = evaluator.compute("full", CPU, DIM)
    assert second == first  # not 10 samples: nothing is carried into the next evaluation
    assert (second["CLS"]["full"]["n"], second["RET"]["full"]["n"]) == (5, 3)


def test_heads_are_rebuilt_only_when_the_text_tower_changes():
    model = build_clip("timelit-micro-ViT")
    evaluator = ZeroShotEvaluator()
    spec = SimpleNamespace(name="CLS", role="adapt", task="classification", classnames=("cat", "dog"),
                           prompt_templates=("a photo of a {}.",), num_samples=2, subset=np.arange(2))  # fmt: skip
    evaluator.configure([spec])
    evaluator.prepare(model.model, model.tokenizer, CPU)
    evaluator.prepare(model.model, model.tokenizer, CPU)
    assert evaluator.head_builds == 1
    with torch.no_grad():
        model.model.visual.conv1.weight.mul_(2.0)
    evaluator.prepare(model.model, model.tokenizer, CPU)
    assert evaluator.head_builds == 1
    with torch.no_grad():
        model.model.text_projection.mul_(2.0)
    evaluator.prepare(model.model, model.tokenizer, CPU)
    assert evaluator.head_builds == 2


def cls_spec(name: str, classnames: tuple[str, ...]) -> SimpleNamespace:
    return SimpleNamespace(name=name, role="adapt", task="classification", classnames=classnames,
                           prompt_templates=("{}",), num_samples=2, subset=np.arange(2))  # fmt: skip


def top1_of(evaluator: ZeroShotEvaluator, images: torch.Tensor, labels: list[int]) -> float:
    evaluator.update(0, Identity(), {"image": images, "label": torch.tensor(labels), "position": torch.arange(2)})
    return evaluator.compute("subset", CPU, DIM)[evaluator.specs[0].name]["subset"]["top1"]


@pytest.mark.parametrize("renamed", [False, True])
def test_new_specs_with_unchanged_weights_get_new_heads(renamed):
    # The same weights (the Identity tower has none: one fingerprint) after `configure` with other class lists:
    # heads cached for the old specs would be missing (a renamed dataset) or score against the old classes.
    evaluator = new_evaluator()
    assert evaluator.head_builds == 1
    evaluator.configure([cls_spec("OTHER" if renamed else "CLS", ("c1", "c0"))])
    evaluator.prepare(Identity(), one_hot_tokenizer, CPU)
    assert evaluator.head_builds == 2
    # image e1 is class "c1" (label 0 here), image e0 is "c0" (label 1): both right only with the new head.
    assert top1_of(evaluator, torch.eye(DIM)[[1, 0]], [0, 1]) == 100.0


def test_specs_with_the_same_content_keep_the_heads():
    evaluator = new_evaluator()
    evaluator.configure(specs())  # fresh objects, same datasets, classes and templates (a second `setup`)
    evaluator.prepare(Identity(), one_hot_tokenizer, CPU)
    assert evaluator.head_builds == 1


@pytest.mark.parametrize("label", [-1, DIM])
def test_a_label_outside_the_class_list_names_the_dataset_and_the_range(label):
    evaluator = new_evaluator()
    batch = {"image": CLS_IMAGES[:2], "label": torch.tensor([0, label]), "position": torch.tensor([3, 4])}
    expected = rf"evaluation dataset 'CLS': label\(s\) \[{label}\] at dataset position\(s\) \[4\] are outside 0\.\.5"
    with pytest.raises(ValueError, match=expected):
        evaluator.update(0, Identity(), batch)
