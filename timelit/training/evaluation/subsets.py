"""The fixed evaluation subset of a dataset, used after every task of the stream.

Rule of the reference pipeline: n = min(N, max(2C, 300, int(0.1 N))) samples, int(n / C) per class, the rest drawn at
random. Unlike the pipeline, the subset is drawn once from a fixed seed and never re-drawn: the pipeline shrinks its
subsets at every evaluation and runs its "full" final evaluation on the last subset (FIF_REFERENCE.md §6).
Retrieval sets whose images are their own classes (MSCOCO, Flickr30k) therefore always evaluate in full.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SubsetRule:
    """Size of the evaluation subset during the stream.

    Args:
        fraction: share of the test split (reference: 0.1).
        minimum: at least this many samples (reference: 300).
        per_class: at least this many samples per class (reference: 2).
        seed: the subset is drawn once from this seed, independent of the training seed.
    """

    fraction: float = 0.1
    minimum: int = 300
    per_class: int = 2
    seed: int = 0

    def size(self, num_samples: int, num_classes: int) -> int:
        return min(num_samples, max(self.per_class * num_classes, self.minimum, int(self.fraction * num_samples)))

    def select(self, labels: np.ndarray, num_classes: int | None) -> np.ndarray:
        """Sorted positions of the subset; `num_classes=None` means every sample is its own class."""
        total = len(labels)
        classes = total if num_classes is None else num_classes
        size = self.size(total, classes)
        if size >= total:
            return np.arange(total)
        rng = np.random.default_rng(self.seed)
        per_class = size // classes
        chosen = []
        for label in range(classes):
            members = np.flatnonzero(labels == label)
            chosen.append(rng.permutation(members)[:per_class])
        picked = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
        rest = np.setdiff1d(np.arange(total), picked)
        fill = rng.permutation(rest)[: size - len(picked)]
        return np.sort(np.concatenate([picked, fill]).astype(np.int64))
