"""``HSDAttention``: a drop-in ViT attention running head-split sparse-dense attention (FAR)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..ops import hsda

#: Named attention layouts of SPEC §4 / the FAR paper: (global-head fraction, pattern).
ATTENTION_KINDS = {
    "global": (1.0, "global"),
    "sparse_dense": (0.0, "checkerboard"),
    "hsda": (0.5, "checkerboard"),
    "temporal": (0.0, "temporal"),
    "head_split_temporal": (0.5, "temporal"),
}


def attention_kind(name: str, num_heads: int):
    """``(num_global_heads, pattern)`` of a named layout, e.g. ``"hsda"`` -> ``(H // 2, "checkerboard")``."""
    if name not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {sorted(ATTENTION_KINDS)}, got {name!r}")
    fraction, pattern = ATTENTION_KINDS[name]
    return int(num_heads * fraction), pattern


class HSDAttention(nn.Module):
    """Multi-head self-attention whose heads ``[0, Hg)`` attend globally and the rest within
    their checkerboard group (SPEC §1.2), with the parameters of a timm / VideoMAE attention.

    Parameters: ``qkv`` (``Linear(D, 3 * H * d)``, bias only with ``qkv_bias``), ``q_bias`` and
    ``v_bias`` (VideoMAE style, with ``qv_bias``; the key has no bias), ``proj``.

    Args:
        dim: token width ``D``. num_heads: ``H``. grid: default ``(T, Hp, Wp)`` of the tokens.
        num_global_heads: ``Hg``, default ``H // 2``. pattern: group rule of the other heads.
        head_dim: ``d``, default ``D // H``. qk_scale: default ``d ** -0.5``.

    Shapes: ``forward(x (B, N, D), grid=None) -> (B, N, D)``.
    """

    def __init__(self, dim: int, num_heads: int = 8, grid=None, num_global_heads: Optional[int] = None,
                 pattern="checkerboard", qkv_bias: bool = False, qv_bias: bool = False,
                 qk_scale: Optional[float] = None, head_dim: Optional[int] = None, proj_drop: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads={num_heads} (or pass head_dim), got {dim}")
        if qkv_bias and qv_bias:
            raise ValueError("pass qkv_bias (timm: bias on q, k and v) or qv_bias (VideoMAE: q and v only), not both")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.num_global_heads = num_heads // 2 if num_global_heads is None else checks.count(
            "num_global_heads", num_global_heads, 0, num_heads)
        if isinstance(pattern, torch.Tensor):  # a buffer, so it follows the module across devices
            self.register_buffer("pattern", pattern.long(), persistent=False)
        else:
            self.pattern = pattern
        self.grid = None if grid is None else checks.grid(grid)
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(inner))
            self.v_bias = nn.Parameter(torch.zeros(inner))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_attention(cls, attn: nn.Module, grid=None, num_global_heads: Optional[int] = None,
                       pattern="checkerboard", backend: Optional[str] = None) -> "HSDAttention":
        """Convert a timm ``Attention`` or VideoMAE ``Attention`` (same weights, shared tensors copied).

        With ``num_global_heads = H`` the result computes exactly what ``attn`` computes.
        """
        for name in ("qkv", "proj", "num_heads"):
            if not hasattr(attn, name):
                raise TypeError(f"attn must be a timm/VideoMAE attention with .qkv, .proj and .num_heads; "
                                f"{type(attn).__name__} has no .{name}")
        for name in ("q_norm", "k_norm"):
            if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
                raise NotImplementedError(f"attn.{name} is not supported (qk-norm); got {getattr(attn, name)}")
        drop = getattr(attn, "attn_drop", None)
        drop = drop.p if isinstance(drop, nn.Dropout) else (drop or 0.0)
        if drop:
            raise NotImplementedError(f"attention dropout is not supported by the fused op; attn.attn_drop={drop}")
        num_heads = attn.num_heads
        inner = attn.qkv.out_features // 3
        qv_bias = getattr(attn, "q_bias", None) is not None
        new = cls(attn.qkv.in_features, num_heads, grid=grid, num_global_heads=num_global_heads, pattern=pattern,
                  qkv_bias=attn.qkv.bias is not None, qv_bias=qv_bias, qk_scale=getattr(attn, "scale", None),
                  head_dim=inner // num_heads, proj_drop=getattr(attn.proj_drop, "p", 0.0), backend=backend)
        with torch.no_grad():
            new.qkv.weight.copy_(attn.qkv.weight)
            if attn.qkv.bias is not None:
                new.qkv.bias.copy_(attn.qkv.bias)
            if qv_bias:
                new.q_bias.copy_(attn.q_bias)
                new.v_bias.copy_(attn.v_bias)
            new.proj.load_state_dict(attn.proj.state_dict())
        return new.to(attn.qkv.weight.device, attn.qkv.weight.dtype)

    def forward(self, x: torch.Tensor, grid=None, return_cls_attention: bool = False):
        """``x (B, N, D) -> (B, N, D)``; with ``return_cls_attention`` also ``(B, N - 1)``: the
        attention of token 0 (a CLS token) to every other token, averaged over heads, without
        gradient (STTM's attentiveness scores; all heads must be global)."""
        b, n, _ = x.shape
        bias = self.qkv.bias
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)     # strided (B, H, N, d) views: no copy
        o = hsda(q, k, v, grid if grid is not None else self.grid, self.num_global_heads, self.pattern,
                 self.scale, backend=self.backend)
        out = self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)))
        if not return_cls_attention:
            return out
        if self.num_global_heads != self.num_heads:
            raise ValueError("return_cls_attention needs every head global (the CLS token has no group), "
                             f"got num_global_heads={self.num_global_heads} of {self.num_heads}")
        with torch.no_grad():  # one query row: cheap next to the attention itself
            row = torch.softmax(self.scale * q[:, :, :1] @ k.transpose(-1, -2), dim=-1)   # (B, H, 1, N)
        return out, row.mean(dim=1)[:, 0, 1:]

    def extra_repr(self) -> str:
        pattern = "tensor" if isinstance(self.pattern, torch.Tensor) else self.pattern
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_global_heads={self.num_global_heads}, "
                f"pattern={pattern}, grid={self.grid}")
