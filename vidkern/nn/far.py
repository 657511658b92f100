"""FAR's token-group interaction and group-averaged classifier (SPEC §1.3, §1.4)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks, patterns, sdpa
from ..ops import group_mean
from . import _checks


def _grouped_conv3d(conv: nn.Conv3d, u: torch.Tensor) -> torch.Tensor:
    """``conv(u)``, except that where it would run in bfloat16 on the CPU it runs in float32.

    Why: torch 2.14.1's oneDNN kernel for a *grouped* bfloat16 Conv3d on the CPU (used on CPUs
    with native bf16, e.g. AVX-512-BF16/AMX) returns non-finite weight gradients in about 5-15%
    of backward calls (``Conv3d(96, 96, 3, padding=1, groups=6)``: 2-10 of 60; ``groups=1``,
    float16 and oneDNN off were clean). ``torch.backends.mkldnn.flags(enabled=False)`` would
    only cover the forward: the backward runs later, outside the context. So input, weight and
    bias are upcast (autocast off) and the result is cast back to bfloat16, the dtype autocast
    or a bfloat16 module would have produced; gradients reach the weights in their own dtype.
    GPUs (cuDNN) and every other dtype take ``conv`` unchanged.
    """
    if u.device.type == "cpu":
        autocast = torch.is_autocast_enabled("cpu") and u.dtype != torch.float64   # autocast leaves fp64 alone
        dtype = torch.get_autocast_dtype("cpu") if autocast else u.dtype
        if dtype == torch.bfloat16:
            bias = None if conv.bias is None else conv.bias.float()
            with torch.autocast("cpu", enabled=False):
                out = F.conv3d(u.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation,
                               conv.groups)
            return out.to(dtype)
    return conv(u)


class TokenGroupInteraction(nn.Module):
    """Bottleneck grouped 3-D convolution over the token grid (SPEC §1.3).

    ``forward(x (B, N, D), grid=None) -> (B, N, D)`` returns the *branch*
    ``Linear(D/4 -> D)(GELU(Conv3d_{3x3x3, groups}(Linear(D -> D/4)(x))))``; the FAR block adds it
    to ``x``. The convolution is PyTorch's (cuDNN on GPU; on the CPU a bfloat16 one runs in
    float32, see :func:`_grouped_conv3d`). ``zero_init`` zeroes the last projection so a
    pretrained network starts unchanged. With ``token_order="grouped"`` the tokens come in
    ``pattern``'s grouped order: the ``D / 4``-channel bottleneck is gathered to grid order for the
    convolution and back (two gathers of a quarter of the width).
    """

    def __init__(self, dim: int, grid=None, num_groups: int = 6, reduction: int = 4, zero_init: bool = False,
                 token_order: str = "natural", pattern="checkerboard"):
        super().__init__()
        _checks.positive_int("dim", dim)
        _checks.positive_int("num_groups", num_groups)
        _checks.positive_int("reduction", reduction)
        hidden = dim // reduction
        if hidden == 0 or hidden % num_groups:
            raise ValueError(f"dim // reduction = {dim} // {reduction} = {hidden} must be a positive multiple of "
                             f"num_groups, got num_groups={num_groups}")
        self.grid = _checks.grid(grid)
        self.token_order = checks.choice("token_order", token_order, sdpa.TOKEN_ORDERS)
        _checks.set_pattern(self, pattern, self.grid)
        self.fc1 = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=num_groups)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        x = _checks.tokens(x, self.fc1.in_features)
        b, n, _ = x.shape
        t, hp, wp = _checks.forward_grid(grid, self.grid, n)
        u = self.fc1(x)
        if self.token_order == "grouped":
            perm = patterns.grouped_order(self.pattern, (t, hp, wp), x.device)[0]
            u = u[:, torch.argsort(perm)]                              # to grid order
        u = u.transpose(1, 2).reshape(b, self.fc1.out_features, t, hp, wp)
        u = self.act(_grouped_conv3d(self.conv, u)).flatten(2).transpose(1, 2)
        if self.token_order == "grouped":
            u = u[:, perm]                                             # back to grouped order
        return self.fc2(u)

    def extra_repr(self) -> str:
        pattern = "explicit" if isinstance(self.pattern, torch.Tensor) else repr(self.pattern)
        return (f"dim={self.fc1.in_features}, hidden={self.fc1.out_features}, num_groups={self.conv.groups}, "
                f"grid={self.grid}, token_order={self.token_order!r}, pattern={pattern}")


class GroupAveragedClassifier(nn.Module):
    """Classifier over per-group mean tokens (SPEC §1.4).

    Mean-pool each checkerboard group -> ``(B, G, D)``; ``fc_norm`` (LayerNorm) each; combine by
    concatenation (``combine="concat"``, ``head = Linear(G * D, classes)``, the default) or mean
    (``combine="mean"``, ``Linear(D, classes)``). ``forward(x (B, N, D), grid=None) -> (B, classes)``.

    With ``"concat"`` the group count ``G`` is fixed by ``grid`` and ``pattern`` at construction
    (2 for the checkerboard, 1 on a 1x1 spatial grid, ``Hp * Wp`` for ``"temporal"``), and a
    forward grid with another ``G`` is refused; ``"mean"`` takes any grid. With
    ``token_order="grouped"`` the tokens come in ``pattern``'s grouped order: each group is a
    contiguous run, pooled as such.
    """

    def __init__(self, dim: int, num_classes: int, grid=None, pattern="checkerboard", combine: str = "concat",
                 eps: float = 1e-6, head_dropout: float = 0.0, token_order: str = "natural"):
        super().__init__()
        _checks.positive_int("dim", dim)
        _checks.positive_int("num_classes", num_classes)
        if combine not in ("concat", "mean"):
            raise ValueError(f"combine must be 'concat' or 'mean', got {combine!r}")
        self.grid = _checks.grid(grid)
        _checks.set_pattern(self, pattern, self.grid)
        self.combine = combine
        self.token_order = checks.choice("token_order", token_order, sdpa.TOKEN_ORDERS)
        if combine == "concat" and self.grid is None:
            raise ValueError("grid is required with combine='concat' (it fixes the number of groups G)")
        explicit = isinstance(self.pattern, torch.Tensor)
        if explicit and patterns.host_ids(self.pattern).missing:   # the head would be sized by the largest id
            facts = patterns.host_ids(self.pattern)
            raise ValueError(f"pattern tensor must use every group id in [0, {facts.num_groups}) (G = max id + 1 "
                             f"sizes the head); missing {facts.missing_examples()}"
                             + (f" and {facts.missing - 8} more" if facts.missing > 8 else ""))
        self.num_groups = (patterns.num_groups(self.pattern, self.grid) if explicit or self.grid is not None
                           else None)
        self.fc_norm = nn.LayerNorm(dim, eps=_checks.positive_float("eps", eps))
        self.head_dropout = nn.Dropout(_checks.probability("head_dropout", head_dropout))
        self.head = nn.Linear(dim * (self.num_groups if combine == "concat" else 1), num_classes)

    def _groups(self, grid: tuple) -> int:
        """``G`` of the forward ``grid``; with ``"concat"`` it must be the one the head was built for."""
        if isinstance(self.pattern, torch.Tensor):
            return self.num_groups                  # fixed by the ids (group_mean checks N against them)
        g = patterns.num_groups(self.pattern, grid)
        if self.combine == "concat" and g != self.num_groups:
            raise ValueError(f"grid={grid} gives G={g} {self.pattern!r} groups, but this classifier's head "
                             f"(combine='concat') was built for num_groups={self.num_groups} (grid={self.grid}); "
                             f"pass a grid with {self.num_groups} groups or use combine='mean'")
        return g

    def forward(self, x: torch.Tensor, grid: Optional[tuple] = None) -> torch.Tensor:
        x = _checks.tokens(x, self.fc_norm.normalized_shape[0])
        grid = _checks.forward_grid(grid, self.grid, x.shape[1])
        pattern = self.pattern
        if self.token_order == "grouped":     # the grouped tokens' ids: sorted, so each group is contiguous
            pattern = patterns.grouped_order(self.pattern, grid, x.device)[1]
        pooled = self.fc_norm(group_mean(x, grid, pattern, self._groups(grid)))
        pooled = pooled.flatten(1) if self.combine == "concat" else pooled.mean(1)
        return self.head(self.head_dropout(pooled))

    def extra_repr(self) -> str:
        return f"combine={self.combine}, num_groups={self.num_groups}"
