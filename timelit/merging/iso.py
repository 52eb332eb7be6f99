"""Isotropic merging: flatten the spectrum of the merged task matrix (Marczak et al., "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", arXiv 2502.04959, §3.2 Iso-C and §3.3 Iso-CTS).

    merge(base, experts, "iso_c")                                   # lam 1
    merge(base, experts, "iso_cts", common_space_fraction=0.8)      # lam 1
    timelit fit --config quickstart.yaml --config protocols/offline_merge_iso_c.yaml

Per matrix (``spectral.is_matrix``), with tau_s = sum_i tau_i and r = min(rows, columns):

- **Iso-C**: tau_s = U diag(s) V^T; every singular value is replaced by their mean, tau = mean(s) U V^T. The merged
  matrix acts alike in every direction the tasks span, so no task's directions are drowned by the dominant ones.
- **Iso-CTS**: the top k_c singular directions of tau_s form the common subspace; each task's own directions are the
  top s of its task matrix projected off that subspace, tau_i - U_c U_c^T tau_i; the common and the N task-specific
  sets are stacked (r columns in all), each stack is replaced by its nearest orthogonal matrix (as in TSV-Merge), and
  tau = mean(all kept singular values) U_perp V_perp^T. Sizes, as the authors' code takes them: k_c =
  floor(common_space_fraction * r), then s = round((r - k_c) / N) (Python's round, half to even; at most floor(r / N))
  and k_c = r - N s, so that the task-specific shares are equal and the total is r. When s is 0 (a small matrix or
  many experts) Iso-CTS is Iso-C.

theta = theta_0 + lam * tau. Other floating tensors get the mean task vector (the authors' choice). Zero task
vectors are dropped per tensor first (``spectral``; the sum is unchanged by them, the task-specific spaces would
not be). The projection acts on the left (column) space, as the authors define it, so Iso-CTS of a matrix and of its
transpose differ; open_clip stores ``visual.proj`` and ``text_projection`` as (in, out), the transpose of
``nn.Linear``'s (out, in).

Not incremental: Iso-C's sum could be carried, but its spectrum is flattened by an SVD of the whole sum at every
merge, and Iso-CTS takes per-task subspaces of every expert; an `all` protocol reads every expert again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from timelit.merging.spectral import SpectralTechnique, mean_singular_value, orthogonalize, svd
from timelit.merging.technique import UNIT
from timelit.merging.whole import WholeTensor


def task_sum(tensor: WholeTensor, kept: Sequence[int]) -> torch.Tensor:
    """tau_s = sum_i tau_i in float32, in store order."""
    total = tensor.task_vector(kept[0])
    for tau in tensor.task_vectors(kept[1:]):
        total += tau
    return total


def subspace_sizes(rank: int, n: int, common_space_fraction: float) -> tuple[int, int]:
    """(k_c, s): the common subspace's size and each task's, with k_c + N s = r (see the module docstring)."""
    common = int(common_space_fraction * rank)
    per_task = min(round((rank - common) / n), rank // n)
    return rank - n * per_task, per_task


@dataclass(frozen=True, kw_only=True)
class IsoC(SpectralTechnique):
    """Iso-C per matrix; lam (default 1, the paper's; it tunes about 1.0-1.5), scope and LiNeS as in
    :class:`TaskVectorTechnique`."""

    name: ClassVar[str] = "iso_c"
    hints: ClassVar[dict[str, str]] = {
        "scaling_factor": "the authors' scaling_factor is `lam`",
        "common_space_fraction": "Iso-C has no task-specific subspaces; the fraction is iso_cts's",
    }

    def merge_matrix(self, tensor: WholeTensor, kept: Sequence[int]) -> torch.Tensor:
        u, s, vh = svd(task_sum(tensor, kept))
        return u.mul_(mean_singular_value(s)) @ vh


@dataclass(frozen=True, kw_only=True)
class IsoCts(SpectralTechnique):
    """Iso-CTS per matrix; lam, scope and LiNeS as in :class:`TaskVectorTechnique`.

    Args:
        common_space_fraction: the share of the rank given to the common subspace of sum_i tau_i, in [0, 1]
            (default 0.8, the paper's); the rest is split evenly among the tasks.
    """

    common_space_fraction: float = 0.8

    name: ClassVar[str] = "iso_cts"
    hints: ClassVar[dict[str, str]] = {"scaling_factor": "the authors' scaling_factor is `lam`"}
    ranges: ClassVar = {"common_space_fraction": UNIT}

    def merge_matrix(self, tensor: WholeTensor, kept: Sequence[int]) -> torch.Tensor:
        u, s, vh = svd(task_sum(tensor, kept))
        common, per_task = subspace_sizes(len(s), len(kept), self.common_space_fraction)
        if not per_task:  # no task-specific directions: exactly Iso-C (the common basis is already orthonormal)
            return u.mul_(mean_singular_value(s)) @ vh
        lefts, values, rights = [u[:, :common]], [s[:common]], [vh[:common].T]
        basis = u[:, :common]
        for tau in tensor.task_vectors(kept):
            tau -= basis @ (basis.T @ tau)
            u_i, s_i, vh_i = svd(tau)
            lefts.append(u_i[:, :per_task].clone())
            values.append(s_i[:per_task].clone())
            rights.append(vh_i[:per_task].T.clone())
        left, right = orthogonalize(torch.cat(lefts, dim=1)), orthogonalize(torch.cat(rights, dim=1))
        return left.mul_(mean_singular_value(torch.cat(values))) @ right.T
