"""``TEAM``: softmax-weighted summarize-and-gate (Park & Choi, SPEC §2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import checks
from ..ops import feature_summary, team_gate
from . import _checks

#: SPEC §2 ratios (r1, r2, r3) by width and block range.
TEAM_RATIOS = {
    384: {"early": (0.2, 0.4, 0.6), "late": (0.08, 0.16, 0.32)},
    768: {"early": (0.225, 0.45, 0.675), "late": (0.1, 0.2, 0.4)},
}


def team_width(ratio: float, dim: int) -> int:
    """Hidden width ``floor(r * D + 0.5)`` (SPEC §2)."""
    return int(ratio * dim + 0.5)


class TEAM(nn.Module):
    """Feature attention (FAM) then token attention (TAM), SPEC §2.

    ``f = feature_summary(X)`` (softmax over tokens per channel), ``h = W3 GELU W2 GELU W1 GELU W0 f``,
    ``Y = team_gate(X, h)`` (sigmoid gate, softmax-over-channels summary, softmax over tokens,
    both products fused). The MLP stays ``nn.Linear`` (cuBLAS). The block uses it as
    ``x = x + TEAM(LN3(x))``. ``forward(x (B, N, D)) -> (B, N, D)``.
    """

    def __init__(self, dim: int, ratios=(0.2, 0.4, 0.6), backend: Optional[str] = None):
        super().__init__()
        _checks.positive_int("dim", dim)
        if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__len__") or len(ratios) != 3:
            raise ValueError(f"ratios must be (r1, r2, r3), got {ratios!r}")
        ratios = tuple(checks.finite(f"ratios[{i}]", r, positive=True) for i, r in enumerate(ratios))
        widths = [dim] + [team_width(r, dim) for r in ratios] + [dim]
        if min(widths) < 1:
            raise ValueError(f"ratios {tuple(ratios)} give an empty hidden layer for dim={dim}: widths {widths}")
        layers = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(w_in, w_out))
        self.mlp = nn.Sequential(*layers)
        self.ratios = ratios
        self.backend = _checks.backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _checks.tokens(x, self.mlp[0].in_features)
        h = self.mlp(feature_summary(x, backend=self.backend))
        return team_gate(x, h, backend=self.backend)

    def extra_repr(self) -> str:
        return f"ratios={self.ratios}"
