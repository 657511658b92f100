"""FAR's token-group interaction and group-averaged classifier (SPEC §1.3, §1.4)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import checks, patterns
from ..ops import group_mean


class TokenGroupInteraction(nn.Module):
    """Bottleneck grouped 3-D convolution over the token grid (SPEC §1.3).

    ``forward(x (B, N, D), grid=None) -> (B, N, D)`` returns the *branch*
    ``Linear(D/4 -> D)(GELU(Conv3d_{3x3x3, groups}(Linear(D -> D/4)(x))))``; the FAR block adds it
    to ``x``. The convolution is PyTorch's (cuDNN on GPU). ``zero_init`` zeroes the last
    projection so a pretrained network starts unchanged.
    """

    def __init__(self, dim: int, grid=None, num_groups: int = 6, reduction: int = 4, zero_init: bool = False):
        super().__init__()
        hidden = dim // reduction
        if hidden % num_groups:
            raise ValueError(f"dim // reduction = {hidden} must be divisible by num_groups, got num_groups={num_groups}")
        self.grid = None if grid is None else checks.grid(grid)
        self.fc1 = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=num_groups)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        b, n, _ = x.shape
        t, hp, wp = checks.grid(grid if grid is not None else self.grid, n)
        u = self.fc1(x).transpose(1, 2).reshape(b, self.fc1.out_features, t, hp, wp)
        u = self.act(self.conv(u)).flatten(2).transpose(1, 2)
        return self.fc2(u)


class GroupAveragedClassifier(nn.Module):
    """Classifier over per-group mean tokens (SPEC §1.4).

    Mean-pool each checkerboard group -> ``(B, G, D)``; ``fc_norm`` (LayerNorm) each; combine by
    concatenation (``combine="concat"``, ``head = Linear(G * D, classes)``, the default) or mean
    (``combine="mean"``, ``Linear(D, classes)``). ``forward(x (B, N, D), grid=None) -> (B, classes)``.
    """

    def __init__(self, dim: int, num_classes: int, grid=None, pattern="checkerboard", combine: str = "concat",
                 eps: float = 1e-6, head_dropout: float = 0.0):
        super().__init__()
        if combine not in ("concat", "mean"):
            raise ValueError(f"combine must be 'concat' or 'mean', got {combine!r}")
        self.grid = None if grid is None else checks.grid(grid)
        if isinstance(pattern, torch.Tensor):  # a buffer, so it follows the module across devices
            self.register_buffer("pattern", pattern.long(), persistent=False)
        else:
            self.pattern = pattern
        self.combine = combine
        if combine == "concat" and self.grid is None:
            raise ValueError("grid is required with combine='concat' (it fixes the number of groups G)")
        self.num_groups = patterns.num_groups(pattern, self.grid) if self.grid is not None else None
        self.fc_norm = nn.LayerNorm(dim, eps=eps)
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(dim * (self.num_groups if combine == "concat" else 1), num_classes)

    def forward(self, x: torch.Tensor, grid: Optional[tuple] = None) -> torch.Tensor:
        pooled = self.fc_norm(group_mean(x, grid if grid is not None else self.grid, self.pattern, self.num_groups))
        pooled = pooled.flatten(1) if self.combine == "concat" else pooled.mean(1)
        return self.head(self.head_dropout(pooled))

    def extra_repr(self) -> str:
        return f"combine={self.combine}, num_groups={self.num_groups}"
