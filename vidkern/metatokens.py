"""The rules of STTM's meta-token selection (SPEC §3.1) beyond the greedy pick itself: the eval
start token, the candidate count ``K`` and the attentiveness filter. One home for them: the float64
reference (:func:`vidkern.reference.select_meta_tokens`) and the fused path
(:func:`vidkern.select_meta_tokens`) both apply these functions.
"""
from __future__ import annotations

import math

import torch


def default_start(x):
    """Eval-mode start token *(choice)*: the token of largest L2 norm (lowest index on ties)."""
    return x.norm(dim=-1).argmax(dim=-1)


def candidate_count(length, num_out, has_scores, alpha=1.5):
    """``K``: ``min(L, ceil(alpha * L'))`` candidates with scores, ``L'`` without (SPEC §3.1 step 3)."""
    return min(length, math.ceil(alpha * num_out)) if has_scores else num_out


def filter_by_scores(candidates, scores, num_out):
    """Keep the ``num_out`` candidates of highest score, lowest index on ties; sorted ascending."""
    cand = torch.sort(candidates, dim=1).values
    cand_scores = torch.gather(scores, 1, cand)
    # Stable descending sort over index-sorted candidates: equal scores keep the lower index first.
    order = torch.sort(cand_scores, dim=1, descending=True, stable=True).indices[:, :num_out]
    return torch.sort(torch.gather(cand, 1, order), dim=1).values
