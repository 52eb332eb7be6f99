"""Zero-shot heads, true-class ranks and retrieval recall against hand-computed values.

python -m pytest tests/unit/evaluation -q
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from timelit.training.clip import build_clip
from timelit.training.evaluation.zero_shot import (
    classification_head,
    recall_at_k,
    text_tower_fingerprint,
    true_class_rank,
)

# Images x captions. Caption owners: image 0 has captions 0-1, image 1 caption 2, image 2 captions 3-5.
# Ties that cannot change a rank on purpose: image 0's two captions tie with each other, image 1 is beaten by two
# captions tied at 0.8, caption 5 is beaten by two images tied at 0.3.
SIMILARITY = torch.tensor(
    [
        [0.9, 0.9, 0.2, 0.1, 0.3, 0.3],
        [0.5, 0.8, 0.4, 0.8, 0.1, 0.3],
        [0.6, 0.3, 0.7, 0.2, 0.5, 0.1],
    ]
)
OWNER = torch.tensor([0, 0, 1, 2, 2, 2])


def features_for(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features whose product is exactly `similarity` (one-hot images)."""
    return torch.eye(similarity.shape[0]), similarity.T.clone()


def test_recall_at_k_matches_hand_computed_ranks():
    # i2t: best own caption of image 0 (0.9) is beaten by nothing -> rank 0; image 1's caption (0.4) by 0.5, 0.8,
    # 0.8 -> rank 3; image 2's best (0.5) by 0.6, 0.7 -> rank 2.
    # t2i: captions 0, 1, 4 rank their image first; 2 (0.4 < 0.7) and 3 (0.2 < 0.8) second; 5 (0.1 < 0.3, 0.3) third.
    images, texts = features_for(SIMILARITY)
    recall = recall_at_k(images, texts, OWNER, ks=(1, 2, 3, 4))
    expected = {
        "i2t_R@1": 100 / 3, "i2t_R@2": 100 / 3, "i2t_R@3": 200 / 3, "i2t_R@4": 100.0,
        "t2i_R@1": 50.0, "t2i_R@2": 500 / 6, "t2i_R@3": 100.0, "t2i_R@4": 100.0,
    }  # fmt: skip
    assert recall == pytest.approx(expected)


def test_recall_does_not_depend_on_caption_order():
    images, texts = features_for(SIMILARITY)
    order = torch.tensor([5, 2, 0, 3, 1, 4])
    assert recall_at_k(images, texts[order], OWNER[order]) == pytest.approx(recall_at_k(images, texts, OWNER))


def test_recall_default_ks_are_1_5_10():
    images, texts = features_for(SIMILARITY)
    assert set(recall_at_k(images, texts, OWNER)) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_true_class_rank_counts_strictly_better_classes():
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.2],  # label 2: beaten by 0.5 -> 1
            [0.9, 0.1, 0.4, 0.8],  # label 3: beaten by 0.9 -> 1
            [0.2, 0.1, 0.0, 0.3],  # label 3: best -> 0
            [0.0, 0.1, 0.4, 0.3],  # label 0: worst -> 3
        ]
    )
    rank = true_class_rank(logits, torch.tensor([2, 3, 3, 0]))
    assert rank.tolist() == [1, 1, 0, 3]
    assert [(rank < k).float().mean().item() for k in (1, 2, 4)] == [0.25, 0.75, 1.0]


def test_true_class_rank_breaks_ties_by_the_lower_class_index():
    # rank = classes scoring higher + tied classes with a lower index (argmax's choice among tied classes).
    logits = torch.tensor(
        [
            [0.5, 0.5, 0.1, 0.0],  # label 0: ties with class 1, which has the higher index -> 0 (a top-1 hit)
            [0.5, 0.5, 0.1, 0.0],  # label 1: ties with class 0, lower index -> 1
            [0.2, 0.7, 0.7, 0.7],  # label 2: nothing higher, tied class 1 is lower -> 1
            [0.2, 0.7, 0.7, 0.7],  # label 3: tied classes 1 and 2 are lower -> 2
            [0.9, 0.3, 0.3, 0.1],  # label 2: 0.9 higher, tied class 1 lower -> 2
            [0.9, 0.3, 0.3, 0.1],  # label 1: 0.9 higher, tied class 2 is above it in index -> 1
        ]
    )
    rank = true_class_rank(logits, torch.tensor([0, 1, 2, 3, 2, 1]))
    assert rank.tolist() == [0, 1, 1, 2, 2, 1]
    assert (rank < 1).sum().item() == 1  # the prediction (argmax) is right for the first row only
    assert (logits.argmax(dim=1) == torch.tensor([0, 1, 2, 3, 2, 1])).tolist() == (rank < 1).tolist()


def test_true_class_rank_ties_at_the_top_5_boundary():
    # Eight classes; 0.9 and 0.8 beat the five tied at 0.5 (classes 2-6). The tied classes rank 2, 3, 4, 5, 6 in
    # index order, so classes 2-4 are in the top 5 and classes 5-6 are not; none is a top-1 hit.
    row = [0.9, 0.8, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1]
    labels = torch.tensor([2, 3, 4, 5, 6, 7, 0])
    rank = true_class_rank(torch.tensor([row] * len(labels)), labels)
    assert rank.tolist() == [2, 3, 4, 5, 6, 7, 0]
    assert (rank < 5).tolist() == [True, True, True, False, False, False, True]
    assert (rank < 1).tolist() == [False] * 6 + [True]


def test_class_names_that_differ_only_in_case_share_a_head_row_and_the_lower_one_can_win():
    # QUILT's classes 69/70 ("... Infectious Disease" / "... disease"): open_clip's tokenizer lowercases them into
    # the same prompt, so their head rows are equal and every image ties on them.
    clip = build_clip("timelit-micro-ViT")
    names = ["Dermatopathology and Infectious Disease", "Dermatopathology and Infectious disease", "Hematopathology"]
    head = classification_head(clip.model, clip.tokenizer, names, ["a photo of {}."], torch.device("cpu"))
    assert torch.equal(head[0], head[1])
    image = head[0]
    logits = torch.stack([(row * image).sum() for row in head]).view(1, -1).repeat(2, 1)
    assert logits[0, 0] == logits[0, 1] > logits[0, 2]
    assert true_class_rank(logits, torch.tensor([0, 1])).tolist() == [0, 1]  # was [1, 1]: neither could be top-1


def test_a_collapsed_model_scores_exactly_chance():
    # Every score equal, labels spread evenly over 8 classes: the true class ranks at its own index.
    classes, per_class = 8, 3
    labels = torch.arange(classes).repeat(per_class)
    rank = true_class_rank(torch.zeros(len(labels), classes), labels)
    assert (rank < 1).float().mean().item() == pytest.approx(1 / classes)
    assert (rank < 5).float().mean().item() == pytest.approx(5 / classes)


def test_a_nan_score_ranks_the_row_last_even_when_the_true_class_is_best():
    logits = torch.tensor([[0.9, math.nan, 0.1], [0.9, 0.2, 0.1], [math.nan, 0.2, 0.1]])
    assert true_class_rank(logits, torch.tensor([0, 0, 0])).tolist() == [3, 0, 3]


def test_degenerate_scores_are_not_perfect():
    """A collapsed model (every score equal) or a diverged one (NaN features) must not score 100%."""
    labels = torch.tensor([0, 1, 2])
    assert (true_class_rank(torch.zeros(3, 3), labels) < 1).sum() <= 1
    assert (true_class_rank(torch.full((3, 3), math.nan), labels) < 1).sum() <= 1
    flat = torch.ones(3, 4) / 2
    texts = torch.ones(4, 4) / 2
    assert recall_at_k(flat, texts, torch.tensor([0, 1, 2, 2]), ks=(1,))["t2i_R@1"] < 100


class PromptTable(nn.Module):
    """A stand-in text tower: each prompt string has a fixed embedding; the 'tokens' are row numbers."""

    def __init__(self, table: dict[str, list[float]]):
        super().__init__()
        self.prompts = list(table)
        self.register_buffer("vectors", torch.tensor([table[p] for p in self.prompts]))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.prompts.index(t) for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vectors[tokens]


def test_classification_head_averages_normalised_template_embeddings():
    model = PromptTable({"a cat.": [3.0, 4.0], "the cat!": [1.0, 0.0], "a dog.": [0.0, 5.0], "the dog!": [-3.0, 4.0]})
    head = classification_head(model, model.tokenize, ["cat", "dog"], ["a {}.", "the {}!"], torch.device("cpu"))
    # cat: mean of (0.6, 0.8) and (1, 0) = (0.8, 0.4) -> (2, 1)/sqrt(5); averaging the raw vectors would give (1, 1).
    # dog: mean of (0, 1) and (-0.6, 0.8) = (-0.3, 0.9) -> (-1, 3)/sqrt(10).
    expected = torch.tensor([[2 / math.sqrt(5), 1 / math.sqrt(5)], [-1 / math.sqrt(10), 3 / math.sqrt(10)]])
    torch.testing.assert_close(head, expected)


def test_classification_head_single_template_is_the_normalised_prompt():
    model = PromptTable({"x": [0.0, 2.0], "y": [2.0, 2.0]})
    head = classification_head(model, model.tokenize, ["x", "y"], ["{}"], torch.device("cpu"))
    torch.testing.assert_close(head, torch.tensor([[0.0, 1.0], [2**-0.5, 2**-0.5]]))


def test_text_tower_fingerprint_follows_text_weights_only():
    model = build_clip("timelit-micro-ViT").model
    before = text_tower_fingerprint(model)
    with torch.no_grad():
        model.visual.conv1.weight.add_(1.0)
        model.logit_scale.add_(1.0)  # zero-shot heads do not use the temperature
    assert text_tower_fingerprint(model) == before
    with torch.no_grad():
        model.token_embedding.weight[0, 0] += 1e-3
    assert text_tower_fingerprint(model) != before
