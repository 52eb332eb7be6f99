"""Zero-shot classification heads from prompts, and retrieval recall@k.

    python -m pytest tests/unit/evaluation -q

Classification follows the reference pipeline: each class name goes through the dataset's prompt templates (one
"primer" per FoMo-in-Flux dataset), the normalised text embeddings are averaged over templates and normalised again,
and an image is assigned the class of highest cosine similarity (a tie goes to the lower class index, as argmax).
Retrieval ranks every caption for every image and every image for every caption; an image-to-text hit is any of the
image's own captions in the top k.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def encode_texts(
    model: nn.Module, tokenizer, texts: Sequence[str], device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised text embeddings, in batches."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(chunks)


@torch.no_grad()
def classification_head(
    model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[str], device: torch.device
) -> torch.Tensor:
    """One unit vector per class: the mean over templates of the normalised prompt embeddings, normalised again."""
    prompts = [template.format(name) for name in classnames for template in templates]
    embeddings = encode_texts(model, tokenizer, prompts, device).view(len(classnames), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)


def true_class_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each row, the place of the true class when classes are sorted by score (0 = top-1 hit).

    A tie is broken by the lower class index, as `argmax` (the prediction) breaks it: classes scoring higher than the
    true one rank above it, and so do tied classes with a lower index. Why: open_clip's tokenizer lowercases, so
    QUILT's "Dermatopathology and Infectious Disease" and "...disease" (classes 69/70, likewise 130/131) get the same
    prompt and head row; counting every tie against the sample made all four unreachable (0% top-1 whatever the
    model). Now the lower class of each pair scores as argmax predicts and the higher one can still be in the top 5.
    A collapsed model (every score equal) still scores chance, not 100%: the true class then ranks at its own index,
    so only label 0 is a top-1 hit. A row with a NaN score ranks last (a diverged model scores 0). Storing this rank
    instead of predictions gives every top-k from one number per sample.
    """
    true_scores = logits.gather(1, labels.view(-1, 1))
    lower_index = torch.arange(logits.shape[1], device=logits.device).view(1, -1) < labels.view(-1, 1)
    rank = (logits > true_scores).sum(dim=1) + ((logits == true_scores) & lower_index).sum(dim=1)
    return rank.masked_fill(torch.isnan(logits).any(dim=1), logits.shape[1])


def recall_at_k(
    image_features: torch.Tensor, text_features: torch.Tensor, text_owner: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k in percent; `text_owner[j]` is the row of caption j's image.

    Features must be L2-normalised. Ties count against the query (an equal score ranks above): unlike class indices,
    captions and images have no order that a prediction would follow, so a collapsed model must not hit by position.
    NaN scores miss. An empty set gives NaN.
    """
    if len(image_features) == 0 or len(text_features) == 0:
        return {f"{d}_R@{k}": float("nan") for k in ks for d in ("i2t", "t2i")}
    similarity = image_features.float() @ text_features.float().T  # images x texts
    own = text_owner.view(1, -1) == torch.arange(len(image_features), device=similarity.device).view(-1, 1)
    # image -> text: how many foreign captions score at least as high as the best own caption
    best_own = similarity.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
    image_rank = ((similarity >= best_own) & ~own).sum(dim=1)
    image_rank = image_rank.masked_fill(torch.isnan(similarity).any(dim=1), similarity.shape[1])
    # text -> image: how many other images score at least as high as the caption's own image
    caption_scores = similarity.T  # texts x images
    true_image = caption_scores.gather(1, text_owner.view(-1, 1))
    text_rank = (caption_scores >= true_image).sum(dim=1) - 1
    text_rank = text_rank.masked_fill(torch.isnan(caption_scores).any(dim=1), caption_scores.shape[1])
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (image_rank < k).float().mean().item()
        out[f"t2i_R@{k}"] = 100.0 * (text_rank < k).float().mean().item()
    return out


def text_tower_fingerprint(model: nn.Module) -> str:
    """A hash of every text-tower weight: zero-shot heads are reused only while it is unchanged."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        if name.startswith("visual.") or name == "logit_scale":
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
