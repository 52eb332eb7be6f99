"""Consensus TIES: TIES-merging restricted to the entries that TALL masks' consensus keeps (Wang et al., arXiv
2405.07813, §4 "consensus merging", applied to TIES as in its Table 2).

    merge(base, experts, "consensus_ties")                         # k 0.2, mask_lambda 0.4, min_agree 2
    merge(base, experts, "consensus_ties", k=0.3, scope="tower")   # TIES' trim as the TIME configs set it

theta = theta_0 + lam * tau_TIES * consensus, where tau_TIES is TIES' merged vector (``ties``: trim to the top k of
each |tau_i| over the scope, elect signs by mass, disjoint mean) and consensus is TALL masks' (``tall_masks``), taken
from the untrimmed task vectors and their sum: (sum_i [|tau_i| > mask_lambda |tau_s - tau_i|]) >= min_agree. The
mask is applied to the finished TIES vector, so TIES' scope-wide majority sign (for entries whose trimmed values
cancel) is counted before masking, as TIES alone counts it; min_agree 0 is TIES exactly.

Not incremental: the consensus compares each tau_i with the final sum, so an `all` protocol reads every expert again at
each boundary (min_agree 0 is TIES, which is incremental).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from timelit.merging.chunks import Chunk
from timelit.merging.tall_masks import CONSENSUS_HINTS, Consensus, consensus_drop
from timelit.merging.task_vectors import Elected, sum_in_order
from timelit.merging.ties import Ties


@dataclass(frozen=True, kw_only=True)
class ConsensusTies(Consensus, Ties):
    """TIES (``k``, ``lam``, ``scope``, LiNeS as in :class:`Ties`) masked by the TALL consensus.

    Args:
        mask_lambda: the TALL mask's lambda (default 0.4).
        min_agree: experts whose masks must hold an entry for it to be kept (default 2; 0 = TIES).
    """

    name: ClassVar[str] = "consensus_ties"
    incremental: ClassVar[bool] = False  # the consensus compares every tau_i with the final sum: every expert, again
    hints: ClassVar[dict[str, str]] = {**Ties.hints, **CONSENSUS_HINTS}

    def merge_chunk(self, chunk: Chunk) -> Elected:
        elected = super().merge_chunk(chunk)
        if self.min_agree == 0:
            return elected
        total = sum_in_order(chunk.task_vectors(), out=chunk.buffer("tall.sum"))
        drop = consensus_drop(chunk, self.mask_lambda, self.min_agree, total)
        # Undecided positions (zero sums, patched by the engine with the majority sign) outside the consensus stay 0.
        kept = ~drop[elected.undecided]
        return Elected(
            elected.tau.masked_fill_(drop, 0.0),
            elected.sign_sum,
            elected.undecided[kept],
            elected.pos_mean[kept],
            elected.neg_mean[kept],
        )
