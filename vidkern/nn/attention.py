"""``HSDAttention``: a drop-in ViT attention running head-split sparse-dense attention (FAR)."""
from __future__ import annotations

import copy
import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks, sdpa
from ..ops import hsda
from . import _checks

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
    _checks.positive_int("num_heads", num_heads)
    if not isinstance(name, str) or name not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {sorted(ATTENTION_KINDS)}, got {name!r}")
    fraction, pattern = ATTENTION_KINDS[name]
    return int(num_heads * fraction), pattern


# What HSDAttention.from_attention carries over from a timm / VideoMAE attention, by attribute
# name: anything else on the source module would be silently dropped, so it is refused.
_CONVERTIBLE_CHILDREN = frozenset({"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"})
_CONVERTIBLE_PARAMETERS = frozenset({"q_bias", "v_bias"})
_FORWARD_ARGS = ("x", "attn_mask", "is_causal")      # timm's Attention.forward(x, attn_mask=None, is_causal=False)


class _SplitQKV(torch.autograd.Function):
    """``(B, N, 3, H, d)`` (the qkv projection's output) -> q, k, v as strided ``(B, H, N, d)``
    views, no copy. The backward writes the three gradients straight into one ``(B, N, 3, H, d)``
    tensor, the layout the projection's backward reads: autograd's own ``unbind`` / ``permute`` /
    ``reshape`` backward stacks them into ``(3, B, H, N, d)`` first and then copies the stack into
    that layout — twice the traffic (about 0.6 GB a ViT-B layer at B = 32, bf16)."""

    @staticmethod
    def forward(ctx, qkv):
        ctx.shape, ctx.dtype, ctx.device = qkv.shape, qkv.dtype, qkv.device
        return tuple(qkv.permute(2, 0, 3, 1, 4).unbind(0))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        for i, g in enumerate((dq, dk, dv)):
            if g is None:
                grad[:, :, i].zero_()
            else:
                grad[:, :, i].copy_(g.transpose(1, 2))
        return grad


def _dropout_p(name: str, module) -> float:
    """The rate of a dropout attribute: an ``nn.Dropout``, ``nn.Identity``/``None`` (0) or a float."""
    if module is None or isinstance(module, nn.Identity):
        return 0.0
    if isinstance(module, nn.Dropout):
        return module.p
    if isinstance(module, (int, float)) and not isinstance(module, bool):
        return float(module)
    raise NotImplementedError(f"attn.{name} must be an nn.Dropout, nn.Identity or a float, got {type(module).__name__}")


class HSDAttention(nn.Module):
    """Multi-head self-attention whose heads ``[0, Hg)`` attend globally and the rest within
    their checkerboard group (SPEC §1.2), with the parameters of a timm / VideoMAE attention.

    Parameters (timm's names): ``qkv`` (``Linear(D, 3 * H * d)``, bias only with ``qkv_bias``),
    ``q_bias`` and ``v_bias`` (VideoMAE style, with ``qv_bias``; the key has no bias), ``proj``
    (``Linear(H * d, dim_out)``); with ``qk_norm`` also ``q_norm``/``k_norm`` (``norm_layer(d)``
    on each head's queries and keys), with ``scale_norm`` ``norm`` (``norm_layer(H * d)`` before
    ``proj``), with ``gated`` ``gate`` (``sigmoid(Linear(D, H * d)(x))`` times the attention output).

    Args:
        dim: token width ``D``. num_heads: ``H``. grid: default ``(T, Hp, Wp)`` of the tokens.
        num_global_heads: ``Hg``, default ``H // 2``. pattern: group rule of the other heads (a
            name of :data:`vidkern.patterns.PATTERN_NAMES` or an int tensor ``(N,)``).
        head_dim: ``d``, default ``D // H``. qk_scale: default ``d ** -0.5``.
        backend: ``None`` (automatic) or one of :func:`vidkern.dispatch.names`.
        token_order: ``"natural"`` (grid order, the default for drop-in use) or ``"grouped"``: the
            tokens come in ``pattern``'s grouped order (``vidkern.patterns.grouped_order``), so the
            sparse heads run as block-diagonal SDPA over views (``vidkern.sdpa``).

    Shapes: ``forward(x (B, N, D), grid=None) -> (B, N, dim_out)``. timm's call
    ``attn(x, attn_mask=None, is_causal=False)`` is accepted; a mask or causal attention is not
    (the groups of the pattern are HSDA's mask) and raises ``NotImplementedError``.
    """

    def __init__(self, dim: int, num_heads: int = 8, grid=None, num_global_heads: Optional[int] = None,
                 pattern="checkerboard", qkv_bias: bool = False, qv_bias: bool = False,
                 qk_scale: Optional[float] = None, head_dim: Optional[int] = None, proj_drop: float = 0.0,
                 backend: Optional[str] = None, *, dim_out: Optional[int] = None, proj_bias: bool = True,
                 qk_norm: bool = False, scale_norm: bool = False, gated: bool = False,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, token_order: str = "natural"):
        super().__init__()
        _checks.positive_int("dim", dim)
        _checks.positive_int("num_heads", num_heads)
        if head_dim is not None:
            _checks.positive_int("head_dim", head_dim)
        elif dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads={num_heads} (or pass head_dim), got {dim}")
        if qkv_bias and qv_bias:
            raise ValueError("pass qkv_bias (timm: bias on q, k and v) or qv_bias (VideoMAE: q and v only), not both")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.num_global_heads = num_heads // 2 if num_global_heads is None else checks.count(
            "num_global_heads", num_global_heads, 0, num_heads)
        self.grid = _checks.grid(grid)
        _checks.set_pattern(self, pattern, self.grid)
        self.scale = checks.finite("qk_scale", qk_scale) if qk_scale is not None else self.head_dim ** -0.5
        self.backend = _checks.backend(backend)
        self.token_order = checks.choice("token_order", token_order, sdpa.TOKEN_ORDERS)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(inner))
            self.v_bias = nn.Parameter(torch.zeros(inner))
        else:
            self.q_bias = self.v_bias = None
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.norm = norm_layer(inner) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, inner, bias=qkv_bias) if gated else None
        self.proj = nn.Linear(inner, _checks.positive_int("dim_out", dim_out) if dim_out is not None else dim,
                              bias=proj_bias)
        self.proj_drop = nn.Dropout(_checks.probability("proj_drop", proj_drop))

    @classmethod
    def from_attention(cls, attn: nn.Module, grid=None, num_global_heads: Optional[int] = None,
                       pattern="checkerboard", backend: Optional[str] = None) -> "HSDAttention":
        """Convert a timm ``Attention`` (``timm.layers.Attention``, every constructor option) or
        an original VideoMAE ``Attention``: same weights (copied), same train/eval mode.

        With ``num_global_heads = H`` the result computes exactly what ``attn`` computes. What
        would not convert exactly raises ``NotImplementedError`` naming the attribute: attention
        dropout (the fused op has none), a submodule, parameter or buffer with no counterpart
        here (e.g. a relative position bias table), a ``forward`` taking more than
        ``(x, attn_mask, is_causal)`` (e.g. rotary embeddings).
        """
        for name, kind in (("qkv", nn.Linear), ("proj", nn.Linear), ("num_heads", int)):
            if not isinstance(getattr(attn, name, None), kind):
                raise TypeError(f"attn must be a timm/VideoMAE attention with .qkv (nn.Linear), .proj (nn.Linear) "
                                f"and .num_heads (int); {type(attn).__name__}.{name} is "
                                f"{type(getattr(attn, name, None)).__name__}")
        for name, child in attn.named_children():
            if name not in _CONVERTIBLE_CHILDREN:
                raise NotImplementedError(f"attn.{name} ({type(child).__name__}) has no counterpart in HSDAttention; "
                                          "converting would drop it")
        for name, p in attn.named_parameters(recurse=False):
            if name not in _CONVERTIBLE_PARAMETERS:
                raise NotImplementedError(f"attn.{name} (a parameter of shape {tuple(p.shape)}) has no counterpart "
                                          "in HSDAttention; converting would drop it")
        for name, buf in attn.named_buffers(recurse=False):
            if not (name == "k_bias" and not bool(buf.any())):      # BEiT/EVA keep an all-zero key bias
                raise NotImplementedError(f"attn.{name} (a buffer of shape {tuple(buf.shape)}) has no counterpart "
                                          "in HSDAttention; converting would drop it")
        extra = [p for p in inspect.signature(attn.forward).parameters if p not in _FORWARD_ARGS]
        if extra:
            raise NotImplementedError(f"{type(attn).__name__}.forward takes {extra}, which HSDAttention does not "
                                      f"implement (it takes {_FORWARD_ARGS})")
        drop = _dropout_p("attn_drop", getattr(attn, "attn_drop", None))
        if drop:
            raise NotImplementedError(f"attention dropout is not supported by the fused op; attn.attn_drop={drop}")
        num_heads, qkv, proj = attn.num_heads, attn.qkv, attn.proj
        inner, rest = divmod(qkv.out_features, 3)
        head_dim = inner // num_heads
        if rest or inner % num_heads or getattr(attn, "head_dim", head_dim) != head_dim:
            raise ValueError(f"attn.qkv.out_features={qkv.out_features} must be 3 * num_heads * head_dim with "
                             f"num_heads={num_heads}, head_dim={getattr(attn, 'head_dim', None)}")
        qv_bias = getattr(attn, "q_bias", None) is not None
        if qv_bias and qkv.bias is not None:
            raise NotImplementedError("attn has both q_bias/v_bias and attn.qkv.bias; HSDAttention takes one of them")
        # timm's fused path calls scaled_dot_product_attention without a scale: it uses d ** -0.5
        # whatever attn.scale says; only the unfused path (and VideoMAE's) multiplies by attn.scale.
        scale = None if getattr(attn, "fused_attn", False) else getattr(attn, "scale", None)
        gate = getattr(attn, "gate", None)
        new = cls(qkv.in_features, num_heads, grid=grid, num_global_heads=num_global_heads, pattern=pattern,
                  qkv_bias=qkv.bias is not None, qv_bias=qv_bias, qk_scale=scale, head_dim=head_dim,
                  proj_drop=_dropout_p("proj_drop", getattr(attn, "proj_drop", None)), backend=backend,
                  dim_out=proj.out_features, proj_bias=proj.bias is not None)
        new = new.to(qkv.weight.device, qkv.weight.dtype)
        with torch.no_grad():
            new.qkv.load_state_dict(qkv.state_dict())
            if qv_bias:
                new.q_bias.copy_(attn.q_bias)
                new.v_bias.copy_(attn.v_bias)
            new.proj.load_state_dict(proj.state_dict())
        # Norms and the gate are copied whole: their type (LayerNorm, RmsNorm, ...) and eps stay.
        for name in ("q_norm", "k_norm", "norm"):
            module = getattr(attn, name, None)
            if module is not None and not isinstance(module, nn.Identity):
                setattr(new, name, copy.deepcopy(module))
        if gate is not None:
            new.gate = copy.deepcopy(gate)
        return new.train(attn.training)

    def forward(self, x: torch.Tensor, grid=None, return_cls_attention: bool = False, *,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """``x (B, N, D) -> (B, N, dim_out)``; with ``return_cls_attention`` also ``(B, N - 1)``: the
        attention of token 0 (a CLS token) to every other token, averaged over heads, without
        gradient (STTM's attentiveness scores; all heads must be global)."""
        x = _checks.tokens(x, self.qkv.in_features)
        if attn_mask is not None:
            shape = tuple(getattr(attn_mask, "shape", ()))
            raise NotImplementedError("attn_mask is not supported by HSDAttention (its pattern's groups are the "
                                      f"mask), got a tensor of shape {shape}; pass None")
        if is_causal:
            raise NotImplementedError("is_causal=True is not supported by HSDAttention; pass is_causal=False")
        b, n, _ = x.shape
        inner = self.num_heads * self.head_dim
        bias = self.qkv.bias
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = _SplitQKV.apply(qkv)                     # strided (B, H, N, d) views: no copy
        q, k = self.q_norm(q), self.k_norm(k)
        o = hsda(q, k, v, grid if grid is not None else self.grid, self.num_global_heads, self.pattern,
                 self.scale, backend=self.backend, token_order=self.token_order)
        o = self.norm(o.transpose(1, 2).reshape(b, n, inner))
        if self.gate is not None:
            o = o * torch.sigmoid(self.gate(x))
        out = self.proj_drop(self.proj(o))
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
        order = "" if self.token_order == "natural" else f", token_order={self.token_order}"
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_global_heads={self.num_global_heads}, "
                f"pattern={pattern}, grid={self.grid}{order}")
