"""OPCM: continual merging by orthogonal projection and adaptive scaling (Tang et al., "Merging Models on the Fly
Without Retraining: A Sequential Approach to Scalable Continual Model Merging", arXiv 2501.09522, §3).

    merge(base, experts, "opcm", alpha=0.5)                           # the fold over every expert, oldest first
    merged, state = merge_step(base, merged, expert, "opcm", state)   # one step, as a TIME run takes it
    timelit fit --config quickstart.yaml --config protocols/ema_ema_opcm.yaml

Experts arrive one at a time. The merge keeps tau_m = theta_m - theta_0 and a scale lambda. For the first expert
tau_m = tau_1 and lambda = 1. For each next expert t, per matrix (``spectral.is_matrix``):

1. tau_m = U diag(s) V^T (thin SVD); P = U^T tau_t V holds tau_t's coordinates on the pairs of the merged vector's
   singular directions;
2. drop the coordinates already in use: P_ii for every direction with s_i > 0, and the block P_ij, i, j < r, where r
   is the number of top singular values whose cumulative share of sum(s) stays at most ``alpha`` (the authors' code
   takes the index of the first share above alpha);
3. the projected update is tau_t minus what was dropped (so the part of tau_t outside the merged vector's row and
   column spaces is kept whole);
4. U_t = lambda_{t-1} tau_m + projected update (every other floating tensor adds tau_t unprojected);
5. lambda_t = ||U_t|| / mean_i ||tau_i|| over the whole model (every merged tensor), and tau_m = U_t / lambda_t: the
   merged vector keeps the mean norm of the experts' task vectors, growing like sqrt(t) in lambda instead.

theta = theta_0 + tau_m. The state carried from step to step is lambda, the sum of the task vector norms and their
count (:class:`OpcmState`); the merged vector itself is the previous merged weights (a run's merged file). An
expert whose task vector is zero over every merged tensor (theta_0 itself) is skipped, state unchanged: merging
theta_0 first would only shrink the mean norm. So OPCM starts the same from theta_0 or from the first expert, and
``all_include_base`` changes nothing.

Differences from the authors' code (FusionBench ``OPCMForCLIP``), each deliberate: it projects ``nn.Linear`` weights
only, timelit every matrix (attention's ``in_proj_weight`` included: open_clip keeps it as one parameter); it
takes P_ii = 0 for every i, also along the null directions of a rank-deficient merged vector, where the singular
vectors are whatever LAPACK returns, and timelit only where s_i > max(s) * max(rows, cols) * eps (the numerical
rank, numpy's rule), so a merged matrix that is still zero leaves tau_t whole; it forms the update with a full SVD,
timelit from the thin one (the same subspace); and it shuffles the model order, where timelit takes store order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from timelit.merging.sources import Source
from timelit.merging.spectral import is_matrix, svd
from timelit.merging.technique import UNIT_OPEN, FoldStep, MergeState, SequentialTechnique
from timelit.merging.whole import read_whole, squared_norm


@dataclass(frozen=True)
class OpcmState:
    """What OPCM carries from one expert to the next, besides the merged weights.

    Args:
        scale: lambda_t, ||lambda_{t-1} tau_m + projected tau_t|| / the mean task vector norm (1 after the first).
        norm_sum: sum of ||tau_i|| over the experts merged so far.
        count: how many experts were merged (zero task vectors are not counted).
    """

    scale: float
    norm_sum: float
    count: int

    def as_dict(self) -> MergeState:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> OpcmState:
        """The state from :meth:`as_dict` (a checkpoint, a merged file's metadata); a clear error otherwise."""
        try:
            scale, norm_sum, count = (state[name] for name in ("scale", "norm_sum", "count"))
        except (KeyError, TypeError):
            raise ValueError(f"not an OPCM state (scale, norm_sum, count): {state!r}") from None
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (scale, norm_sum, count))
        if not numbers or not isinstance(count, int) or count < 1 or scale < 0 or norm_sum <= 0:
            raise ValueError(f"not a valid OPCM state (scale >= 0, norm_sum > 0, count >= 1): {dict(state)!r}")
        return cls(float(scale), float(norm_sum), count)


def split_rank(values: torch.Tensor, alpha: float) -> int:
    """r: how many top singular values hold, together, at most a fraction ``alpha`` of their sum (float64)."""
    wide = values.double()
    total = float(wide.sum())
    return int((wide.cumsum(0) / total <= alpha).sum()) if total > 0 else 0


def numerical_rank(values: torch.Tensor, shape: Sequence[int]) -> int:
    """How many singular values exceed max(s) * max(shape) * float32's eps (numpy's ``matrix_rank`` tolerance)."""
    if not len(values) or float(values[0]) == 0.0:
        return 0
    tolerance = float(values[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((values > tolerance).sum())


def project_update(tau: torch.Tensor, merged: torch.Tensor, alpha: float) -> torch.Tensor:
    """tau with its coordinates on the merged vector's own direction pairs removed (steps 1-3 of the module
    docstring): tau - U_k C V_k^T, where C holds u_i^T tau v_i on the diagonal and the top r x r block of U^T tau V.
    ``tau`` is overwritten."""
    u, s, vh = svd(merged)
    rank = numerical_rank(s, merged.shape)
    if rank == 0:
        return tau
    u, vh = u[:, :rank], vh[:rank]
    top = min(split_rank(s, alpha), rank)
    left = u.T @ tau  # rank x cols: U^T tau
    core = torch.diag((left * vh).sum(dim=1))  # u_i^T tau v_i
    core[:top, :top] = left[:top] @ vh[:top].T
    return tau.sub_(u @ core @ vh)


@dataclass(frozen=True, kw_only=True)
class Opcm(SequentialTechnique):
    """OPCM, folding experts in store order.

    Args:
        alpha: the share of the merged vector's singular value sum whose top directions are protected as a block
            from each new task vector, in [0, 1) (default 0.5, the authors' configuration); 0 removes only the
            diagonal coordinates, larger values protect more.
    """

    alpha: float = 0.5

    name: ClassVar[str] = "opcm"
    hints: ClassVar[dict[str, str]] = {
        "shuffle_order": "timelit merges experts in store (task) order; pass them in the order you want",
        "lam": "OPCM scales by its own lambda_t, which keeps the mean task vector norm; there is no lam",
    }
    ranges: ClassVar = {"alpha": UNIT_OPEN}

    def step(self, fold: FoldStep) -> tuple[dict[str, torch.Tensor], MergeState | None]:
        base, previous, expert, keys = fold.base, fold.previous, fold.expert, fold.keys
        prior = None if fold.state is None else OpcmState.from_dict(fold.state)
        if prior is not None and previous is None:
            raise ValueError("an OPCM state was given without the merged weights it belongs to")
        held: dict[str, torch.Tensor] = {}  # U_t per key, float32: the scale needs the whole model's norm first
        tau_square = held_square = 0.0
        for key in keys:
            theta_0 = read_whole(base, key)
            tau = read_whole(expert, key).sub_(theta_0)
            tau_square += squared_norm(tau)
            if prior is None:
                continue
            merged = read_whole(previous, key).sub_(theta_0)
            update = project_update(tau, merged, self.alpha) if is_matrix(key, tau.shape) else tau
            held[key] = merged.mul_(prior.scale).add_(update)
            held_square += squared_norm(held[key])
        norm = math.sqrt(tau_square)
        if norm == 0.0:  # theta_0 itself: nothing to merge, the merge and its state stay as they were
            if prior is None or previous is None:
                return _copy(base, base, keys), None
            return _copy(previous, base, keys), prior.as_dict()
        if prior is None:  # the first expert is the merge
            return _copy(expert, base, keys), OpcmState(scale=1.0, norm_sum=norm, count=1).as_dict()
        count, norm_sum = prior.count + 1, prior.norm_sum + norm
        mean, size = norm_sum / count, math.sqrt(held_square)
        factor = mean / size if size > 0 else 0.0
        out = {key: _in_dtype(held[key].mul_(factor).add_(read_whole(base, key)), base, key) for key in keys}
        return out, OpcmState(scale=size / mean, norm_sum=norm_sum, count=count).as_dict()


def _in_dtype(tensor: torch.Tensor, base: Source, key: str) -> torch.Tensor:
    return tensor.to(base.entries[key].dtype)


def _copy(source: Source, base: Source, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` of ``source`` in the base's dtypes."""
    return {key: _in_dtype(read_whole(source, key), base, key) for key in keys}
