"""LiNeS: layer-increasing network scaling of a merged task vector (Wang et al., arXiv 2410.17146).

    merge(base, experts, "lines", alpha=0.5, beta=0.5)          # task arithmetic, scaled by depth
    merge(base, experts, "ties", k=0.3, lines=True)             # the same scaling on top of TIES/DARE/Breadcrumbs
    merge(base, experts, "lines", alpha="auto", beta=0.5)       # the paper's multi-task alpha

theta = theta_0 + s(key) * tau_m, where for residual block l of a tower with L blocks s = alpha + beta * l / (L - 1)
and every other key (embeddings, layer norms, projections, logit_scale) gets s = alpha; the scale replaces lambda.
Shallow blocks stay close to the pretrained weights, which preserves zero-shot skill.

Depth is read per open_clip tower from the base's keys: ``visual.transformer.resblocks.{l}.`` for the image tower and
``transformer.resblocks.{l}.`` (``CLIP``) or ``text.transformer.resblocks.{l}.`` (``CustomTextCLIP``, whose text tower
is the module ``text``) for the text tower, so ViT-L/14 gets 24 and 12 (the pipeline takes one L for both).
A tower with a single block gives it s = alpha. Keys of other layouts (e.g. timm trunks) are treated as non-block keys.

``alpha="auto"`` = ||sum_i tau_i||_1 / (N ||tau_m||_1) per scope: it rescales the merged vector to the mean task
vector's norm (1/N for task arithmetic).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from timelit.merging.task_vectors import Summed
from timelit.merging.technique import Scaling, Scope, Technique, check_choice, check_range, check_scope_has_effect

_BLOCK = re.compile(r"^(visual\.|text\.)?transformer\.resblocks\.(\d+)\.")
_TOWER = {"visual.": "visual", "text.": "text", None: "text"}  # CLIP's text tower has no prefix, CustomTextCLIP's text.


def depth_ratios(keys: Iterable[str]) -> dict[str, float]:
    """l / (L - 1) for every key inside a residual block, with L counted per tower; other keys are absent (0)."""
    blocks = {key: (_TOWER[match.group(1)], int(match.group(2))) for key in keys if (match := _BLOCK.match(key))}
    depth: dict[str, int] = {}
    for tower, index in blocks.values():
        depth[tower] = max(depth.get(tower, 0), index + 1)
    return {key: index / (depth[tower] - 1) if depth[tower] > 1 else 0.0 for key, (tower, index) in blocks.items()}


def auto_alpha(sum_l1: float, merged_l1: float, n_experts: int) -> float:
    """||sum_i tau_i||_1 / (N ||tau_m||_1); 0 when tau_m is 0 (then alpha has no effect)."""
    return sum_l1 / (n_experts * merged_l1) if merged_l1 else 0.0


@dataclass(frozen=True, kw_only=True)
class Lines(Summed, Technique):
    """Task arithmetic whose merged vector is scaled by LiNeS instead of lambda.

    Incremental: the running state of an `all` merge is the float32 sum; with ``alpha="auto"`` the norms that give
    alpha are read off that sum when the merge is finished.

    Args:
        alpha: scale of the shallowest block and of every non-block key (default 0.5, the pipeline's), or "auto".
        beta: added scale at the deepest block (default 0.5).
        scope: where ``alpha="auto"`` is computed (see :data:`Scope`); with a fixed alpha it has no effect and
            another scope than ``model`` is an error.
    """

    alpha: float | Literal["auto"] = 0.5
    beta: float = 0.5
    scope: Scope = "model"

    name: ClassVar[str] = "lines"
    hints: ClassVar[dict[str, str]] = {
        "lam": "LiNeS' scale replaces lambda: set alpha and beta",
        "lines_params": "the pipeline's lines_params [alpha, beta, ...] are `alpha` and `beta`",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("scope", self.scope, get_args(Scope))
        if self.alpha != "auto":
            check_range("alpha", self.alpha)
        check_range("beta", self.beta)
        check_scope_has_effect(self.name, self.scope, self.alpha == "auto", "alpha")

    def scaling(self) -> Scaling:
        return Scaling(self.alpha if self.alpha == "auto" else float(self.alpha), float(self.beta))
