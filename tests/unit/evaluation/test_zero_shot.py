"""Zero-shot heads, true-class ranks and retrieval recall against hand-computed values.

python -m pytest tests/unit/evaluation -q
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from timelit.clip import build_clip
from timelit.evaluation.zero_shot import classification_head, recall_at_k, text_tower_fingerprint, true_class_rank

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
