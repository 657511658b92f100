"""A ViT block with vidkern's pieces: FAR attention, token-group interaction and TEAM (SPEC §1.5, §2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _checks
from .attention import HSDAttention, attention_kind
from .far import TokenGroupInteraction
from .team import TEAM


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability ``p`` in training.

    ``forward(x (B, ...)) -> (B, ...)``: each sample's ``x`` is kept (scaled by ``1 / (1 - p)``)
    or zeroed. With ``p = 1`` every branch is zeroed, so ``x + drop_path(branch)`` is the residual
    alone (timm's behaviour; dividing by ``1 - p = 0`` would give NaN).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = _checks.probability("p", p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep_prob = 1.0 - self.p
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * (keep / keep_prob if keep_prob > 0.0 else keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with timm's parameter names. ``forward(x (B, N, D)) -> (B, N, D)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        _checks.positive_int("dim", dim)
        _checks.positive_int("hidden", hidden)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _checks.tokens(x, self.fc1.in_features)
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """``x += TGI(x)``; ``x += Attn(LN1 x)``; ``x += MLP(LN2 x)``; ``x += TEAM(LN3 x)`` (optional parts).

    Args:
        attention: a layout of :data:`vidkern.nn.attention.ATTENTION_KINDS` (``"hsda"`` default,
            ``"global"``, ``"sparse_dense"``, ``"temporal"``, ``"head_split_temporal"``).
        token_group_interaction: add FAR's TGI branch (``tgi_groups`` defaults to ``num_heads``).
        team_ratios: ``(r1, r2, r3)`` adds a TEAM sub-block (SPEC §2), ``None`` leaves it out.
        qv_bias: VideoMAE's q/v biases (``qkv_bias`` gives timm's full qkv bias instead).
        token_order: ``"natural"`` or ``"grouped"`` (the tokens in the attention pattern's grouped
            order, for the attention and TGI; see :class:`HSDAttention`).

    Shapes: ``forward(x (B, N, D), grid=None) -> (B, N, D)``; ``grid`` overrides the default.
    """

    def __init__(self, dim: int, num_heads: int, grid=None, mlp_ratio: float = 4.0, attention: str = "hsda",
                 qkv_bias: bool = False, qv_bias: bool = True, token_group_interaction: bool = False,
                 tgi_groups: Optional[int] = None, team_ratios=None, drop_path: float = 0.0,
                 norm_eps: float = 1e-6, backend: Optional[str] = None, token_order: str = "natural"):
        super().__init__()
        _checks.positive_int("dim", dim)
        hg, pattern = attention_kind(attention, num_heads)        # checks num_heads and attention
        hidden = int(dim * _checks.positive_float("mlp_ratio", mlp_ratio))
        if hidden < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives an empty MLP for dim={dim} "
                             f"(int(dim * mlp_ratio) = {hidden})")
        _checks.positive_float("norm_eps", norm_eps)
        self.grid = _checks.grid(grid)
        self.tgi = (TokenGroupInteraction(dim, grid, num_heads if tgi_groups is None else tgi_groups,
                                          token_order=token_order, pattern=pattern)
                    if token_group_interaction else None)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = HSDAttention(dim, num_heads, grid, hg, pattern, qkv_bias=qkv_bias, qv_bias=qv_bias,
                                 backend=backend, token_order=token_order)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden)
        if team_ratios is not None:
            self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
            self.team = TEAM(dim, team_ratios, backend=backend)
        else:
            self.norm3 = self.team = None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid=None, return_cls_attention: bool = False):
        """With ``return_cls_attention`` also returns the head-averaged attention of token 0 to the
        others, ``(B, N - 1)`` (see :meth:`HSDAttention.forward`)."""
        x = _checks.tokens(x, self.norm1.normalized_shape[0])
        grid = grid if grid is not None else self.grid
        if self.tgi is not None:
            x = x + self.drop_path(self.tgi(x, grid))
        attn = self.attn(self.norm1(x), grid, return_cls_attention)
        attn, cls_attention = attn if return_cls_attention else (attn, None)
        x = x + self.drop_path(attn)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.team is not None:
            x = x + self.drop_path(self.team(self.norm3(x)))
        return (x, cls_attention) if return_cls_attention else x
