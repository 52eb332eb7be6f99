"""What the per-matrix SVD techniques share: which tensors are matrices, the SVD, the polar factor, and the kernel
kind that receives a whole matrix of every expert.

    merge(base, experts, "tsv")        # tsv.py; iso.py (iso_c, iso_cts) and opcm.py build on the same pieces

Spectral methods (TSV-Merge arXiv 2412.00081, Iso-C / Iso-CTS arXiv 2502.04959, OPCM arXiv 2501.09522) act on the
singular vectors of each layer's task matrix, which no element-wise kernel can see. :class:`SpectralTechnique` is the
engine's second kind of kernel: :meth:`SpectralTechnique.merge_matrix` receives one matrix of every expert at a time
(read on demand through ``whole.WholeTensor``), so a merge holds at most the largest matrix times the number of
experts, whatever the model's size; tensors that are not matrices keep the chunked element-wise path.

**Which tensors are matrices** (:func:`is_matrix`): 2-D tensors with both sides at least 2 whose key does not name
an embedding. Attention's stacked ``in_proj_weight``, the MLP weights, ``visual.proj`` and ``text_projection`` are
linear maps; embedding tables (``token_embedding.weight``, the positional and class embeddings) are lookup tables
whose rows are independent, so their spectrum means nothing (and ViT-B/16's 49408 x 512 token table would cost more
than every other SVD together). Biases, norms, ``logit_scale`` and the 4-D patch convolution are not matrices either.
The reference codes SVD every 2-D tensor except ``text_projection`` and merge only the vision tower; timelit merges
both towers, so the text tower's tables are kept out by name instead.

**Zero task vectors**: an expert whose task vector on a tensor is exactly zero (an expert equal to theta_0, as the
older model of the first EMA step from theta_0 is) is dropped for that tensor first, and N counts the others, as
model stock does (MERGING.md): the singular vectors of a zero matrix are whatever LAPACK returns, and stacking them
would bend the other experts' directions. With none left the merged task vector is 0.

**Precision**: SVDs run in float32 (LAPACK's float32 factors are orthonormal to ~1e-6, far below the scale of a
fine-tuning update); scalar statistics (norms, means of singular values, cumulative shares) are taken in float64.
Where a task matrix's singular values are nearly equal at the truncation point (k of TSV, s of Iso-CTS), which
directions are kept is ill-conditioned in any precision: float32 and float64 pick directions that differ by about
eps / (relative gap), e.g. 4e-6 on merged values of 0.03 for 8 Gaussian-noise experts, whose spectra are flat. A
float64 polar factor was tried and changed nothing measurable; fine-tuned task matrices are reported low-rank, with
separated top singular values (TSV-Merge §3). The result does not depend on the chunk size, and files and state
dicts give the same bits: every whole-tensor read and every SVD sees the same float32 numbers in the same order
(with the engine's fixed thread count).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from timelit.merging.chunks import Chunk, TensorJob
from timelit.merging.task_vectors import sum_in_order
from timelit.merging.technique import TaskVectorTechnique
from timelit.merging.whole import WholeTensor


def is_matrix(key: str, shape: Sequence[int]) -> bool:
    """Whether the per-matrix rule applies to tensor ``key`` (see the module docstring); the others take the
    technique's fallback."""
    return len(shape) == 2 and min(shape) >= 2 and "embedding" not in key


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD U diag(S) Vh of a float32 matrix, singular values in descending order.

    A wide matrix is decomposed as its transpose (A^T = V S U^T): torch's CPU SVD of a 768 x 3072 matrix (ViT-B/16's
    ``mlp.c_proj.weight``) took 2.7 s against 0.95 s for the 3072 x 768 transpose, on one thread of this machine."""
    if matrix.shape[0] < matrix.shape[1]:
        v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
        return uh.T, s, v.T
    return torch.linalg.svd(matrix, full_matrices=False)


def orthogonalize(stack: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (rows, if it is wide) in the Frobenius norm: P Q^T of the SVD
    stack = P S Q^T, the orthogonal polar factor (TSV-Merge's and Iso-CTS's whitening of a stacked basis)."""
    left, _, right = svd(stack)
    return left @ right


def mean_singular_value(values: torch.Tensor) -> float:
    return float(values.double().mean())


def nonzero_experts(job: TensorJob) -> list[int]:
    """The experts whose task vector on this tensor is not exactly zero, in store order (a chunked pass that stops
    reading an expert once it has shown a nonzero entry)."""
    nonzero = [False] * len(job.experts)
    for chunk in job.chunks():
        for i in range(len(nonzero)):
            if not nonzero[i]:
                nonzero[i] = bool(chunk.task_vector(i).any())
        if all(nonzero):
            break
    return [i for i, flag in enumerate(nonzero) if flag]


@dataclass(frozen=True, kw_only=True)
class SpectralTechnique(TaskVectorTechnique):
    """Base of the per-matrix SVD techniques: each matrix goes to :meth:`merge_matrix`, every other floating tensor
    gets the mean of the kept task vectors (MERGING.md's fallback); ``lam`` (or LiNeS) scales the result as for the
    other task-vector techniques."""

    def merge_tensor(self, job: TensorJob) -> Iterator[tuple[Chunk, torch.Tensor]]:
        kept = nonzero_experts(job)
        shape = job.base.entries[job.key].shape
        if kept and is_matrix(job.key, shape):
            merged = self.merge_matrix(job.whole(), kept).reshape(-1)
            for chunk in job.chunks():
                yield chunk, merged[chunk.start : chunk.stop]  # disjoint views: the engine may overwrite each
            return
        for chunk in job.chunks():
            result = chunk.buffer("result")
            if kept:
                sum_in_order((chunk.task_vector(i) for i in kept), out=result).div_(len(kept))
            else:
                result.zero_()
            yield chunk, result

    def merge_matrix(self, tensor: WholeTensor, kept: Sequence[int]) -> torch.Tensor:
        """The merged task vector of one matrix from the task vectors of experts ``kept`` (at least one)."""
        raise NotImplementedError
