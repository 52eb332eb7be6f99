"""A_KA, A_ZS and their geometric mean: the three numbers FoMo-in-Flux reports.

A_KA (knowledge accumulation) is the plain mean over the adaptation datasets of their summary figure (top-1 accuracy,
or the mean of image-to-text and text-to-image R@5 for retrieval); A_ZS (zero-shot retention) the same over the
held-out datasets; the summary is sqrt(A_KA * A_ZS). This is the pipeline's formula (`results_from_wandb_xid.py`:
KA = (40 * mean accuracy + R@5 of FSCOCO) / 41), written as one mean over datasets.
"""

from __future__ import annotations

import math
from typing import Any

from timelit.training.evaluation.evaluator import Scope, summary_figure


def summarize(per_dataset: dict[str, dict[str, Any]], scope: Scope = "subset") -> dict[str, float]:
    """{"A_KA", "A_ZS", "GM"} from per-dataset results; without held-out datasets (a stream of one's own data with
    none beside it) only {"A_KA"}, since there is no zero-shot retention to measure; without adaptation datasets
    A_KA and GM are NaN."""
    adapt = [summary_figure(e, scope) for e in per_dataset.values() if e["role"] == "adapt" and scope in e]
    held_out = [summary_figure(e, scope) for e in per_dataset.values() if e["role"] == "eval" and scope in e]
    if adapt and not held_out:
        return {"A_KA": sum(adapt) / len(adapt)}
    a_ka = sum(adapt) / len(adapt) if adapt else float("nan")
    a_zs = sum(held_out) / len(held_out) if held_out else float("nan")
    gm = math.sqrt(a_ka * a_zs) if adapt and held_out and a_ka >= 0 and a_zs >= 0 else float("nan")
    return {"A_KA": a_ka, "A_ZS": a_zs, "GM": gm}
