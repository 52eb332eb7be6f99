"""TSV-Merge: merge each layer's task matrices through their top singular vectors, decorrelated (Gargiulo et al.,
"Task Singular Vectors: Reducing Task Interference in Model Merging", arXiv 2412.00081, §4, eq. 6-8).

    merge(base, experts, "tsv")                     # lam 1
    timelit fit --config quickstart.yaml --config protocols/ema_ema_tsv.yaml

Per matrix (``spectral.is_matrix``), with r = min(rows, columns) and the N experts' task matrices tau_i:
1. SVD each tau_i = U_i diag(s_i) V_i^T and keep its top k = max(1, floor(r / N)) triplets (each task gets an equal
   share of the rank; FusionBench keeps 0 when r < N, MERGING.md keeps at least 1);
2. stack the kept columns of every expert, U = [U_1,k ... U_N,k], V likewise, s = [s_1,k ... s_N,k];
3. replace each stack by its nearest orthogonal matrix, U_perp = P Q^T of U's SVD P S Q^T (TSV's "whitening": the
   tasks' subspaces stop interfering), and V_perp likewise;
4. tau = U_perp diag(s) V_perp^T, and theta = theta_0 + lam * tau.

Other floating tensors get the mean task vector (the paper's and FusionBench's choice). Zero task vectors are
dropped per tensor first (``spectral``); with one expert left, tau is its task vector itself, which is what the
four steps give when all r triplets are kept and the bases are already orthonormal. Each expert's SVD is taken as it
is read and only its k kept columns are held, so a matrix costs the stacks (at most rows x r and columns x r) plus
one expert's factors, whatever N is.

Not incremental: it takes the SVD of every expert's matrices and keeps r/N of each, so an `all` protocol reads every
expert again at each boundary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from timelit.merging.spectral import SpectralTechnique, orthogonalize, svd
from timelit.merging.whole import WholeTensor


def kept_rank(rank: int, n: int) -> int:
    """k = max(1, floor(r / N)): each of the N tasks keeps an equal share of the rank r (at least one triplet)."""
    return max(1, rank // n)


def tsv_factors(task_vectors: Iterable[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_perp, s, V_perp) of TSV-Merge for ``n`` task matrices of one shape, read one at a time; the merged task
    matrix is ``U_perp @ diag(s) @ V_perp.T``."""
    lefts, values, rights = [], [], []
    for tau in task_vectors:
        u, s, vh = svd(tau)
        k = kept_rank(len(s), n)
        lefts.append(u[:, :k].clone())  # clone: let the expert's full factors go
        values.append(s[:k].clone())
        rights.append(vh[:k].T.clone())
    return orthogonalize(torch.cat(lefts, dim=1)), torch.cat(values), orthogonalize(torch.cat(rights, dim=1))


@dataclass(frozen=True, kw_only=True)
class Tsv(SpectralTechnique):
    """TSV-Merge per matrix; lam (default 1, the paper's), scope and LiNeS as in :class:`TaskVectorTechnique`."""

    name: ClassVar[str] = "tsv"
    hints: ClassVar[dict[str, str]] = {
        "alpha": "TSV-Merge's scaling factor (FusionBench's alpha) is `lam`",
        "sv_reduction": "the share of the rank each task keeps is fixed at 1/N (at least one singular triplet)",
    }

    def merge_matrix(self, tensor: WholeTensor, kept: Sequence[int]) -> torch.Tensor:
        if len(kept) == 1:
            return tensor.task_vector(kept[0])
        left, values, right = tsv_factors(tensor.task_vectors(kept), len(kept))
        return (left * values) @ right.T
