"""``STTM``: most-orthogonal meta-token selection and soft merging (Feng et al., SPEC §3)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..ops import select_meta_tokens, soft_merge
from ..reference import NORM_EPS
from . import _checks


def merged_count(num_tokens: int, merge_ratio: float) -> int:
    """``L' = max(1, floor(L * (1 - rho)))`` (SPEC §3)."""
    return max(1, math.floor(num_tokens * (1 - merge_ratio)))


class STTM(nn.Module):
    """Merge ``L`` tokens onto ``L'`` meta tokens (SPEC §3.1-3.2).

    ``forward(x (B, L, D), e (B or 1, L, D), scores=None (B, L)) -> (y (B, L', D), p (B, L', D))``:
    meta tokens are chosen by greedy most-orthogonal selection (random start in training from
    the torch RNG, largest-norm start in eval), filtered by ``scores`` when given; then
    ``u = normalize(phi(x))``, ``(a, p) = soft_merge(u, idx, x, e, tau)`` and ``y = proj([a, p])``.
    ``p`` is the next stage's ``e``. Give exactly one of ``num_out`` and ``merge_ratio``.
    """

    def __init__(self, dim: int, num_out: Optional[int] = None, merge_ratio: Optional[float] = None,
                 tau: float = 1.0, alpha: float = 1.5, backend: Optional[str] = None):
        super().__init__()
        _checks.positive_int("dim", dim)
        if (num_out is None) == (merge_ratio is None):
            raise ValueError(f"give exactly one of num_out and merge_ratio, got num_out={num_out}, merge_ratio={merge_ratio}")
        if num_out is not None:
            _checks.positive_int("num_out", num_out)
        if merge_ratio is not None and not 0 <= checks.finite("merge_ratio", merge_ratio) < 1:
            raise ValueError(f"merge_ratio must be in [0, 1), got {merge_ratio}")
        self.num_out, self.merge_ratio = num_out, merge_ratio
        self.tau = checks.finite("tau", tau, positive=True)
        self.alpha = checks.finite("alpha", alpha)
        if self.alpha < 1:
            raise ValueError(f"alpha must be >= 1 (candidates K = ceil(alpha * L') >= L'), got {alpha}")
        self.backend = _checks.backend(backend)
        self.phi = nn.Linear(dim, dim)
        self.proj = nn.Linear(2 * dim, dim)

    def output_count(self, num_tokens: int) -> int:
        return self.num_out if self.num_out is not None else merged_count(num_tokens, self.merge_ratio)

    def forward(self, x: torch.Tensor, e: torch.Tensor, scores: Optional[torch.Tensor] = None,
                return_indices: bool = False):
        x = _checks.tokens(x, self.phi.in_features, shape_doc="(B, L, D)")
        b, length, _ = x.shape
        # (max: an empty x is refused by select_meta_tokens, with its own message)
        start = torch.randint(0, max(length, 1), (b,), device=x.device) if self.training else None
        idx = select_meta_tokens(x, self.output_count(length), scores, self.alpha, start, backend=self.backend)
        u = F.normalize(self.phi(x), dim=-1, eps=NORM_EPS)
        a, p = soft_merge(u, idx, x, e, self.tau, backend=self.backend)
        y = self.proj(torch.cat([a, p], dim=-1))
        return (y, p, idx) if return_indices else (y, p)

    def extra_repr(self) -> str:
        count = f"num_out={self.num_out}" if self.num_out is not None else f"merge_ratio={self.merge_ratio}"
        return f"{count}, tau={self.tau}, alpha={self.alpha}"
