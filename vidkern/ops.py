"""Public ops: argument checks, backend dispatch, and the ``torch.library`` custom ops.

A public function checks its arguments (:mod:`vidkern.checks`), asks :mod:`vidkern.dispatch`
for a backend, and then either calls the backend directly (the reference, differentiated by
autograd) or goes through a ``vidkern::`` custom op whose forward and backward are the backend's
own. The custom ops have fake implementations, so ``torch.compile(fullgraph=True)`` traces
models that use them without graph breaks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op
from torch.utils.flop_counter import register_flop_formula

from . import backends as _backends  # noqa: F401  (registers the backends)
from . import checks, dispatch, patterns, reference, sdpa


def _pattern_arg(name: str, ids: Optional[Tensor]):
    return ids if ids is not None else name


# =========================================================================== attention
def _autocast(policy: str, *tensors: Tensor) -> tuple:
    """An op's autocast policy, applied inside ``torch.autocast`` regions before the checks run.

    ``"lower"``: matrix-product ops (``hsda``, ``soft_merge``) run in the autocast dtype, as torch
    runs ``mm``/``bmm``/SDPA. ``"widest"``: softmax-and-gate ops (``team_gate``) run in the widest
    floating dtype of their inputs, torch's promote policy, so an fp32 stream is not rounded down
    because a small Linear produced a bf16 gate. Outside autocast the inputs are returned unchanged
    (and mixed dtypes are an error, as documented). Float64 inputs are never cast (as torch's own
    autocast does: it only casts lower-precision-eligible float16/bfloat16/float32 tensors).
    """
    if not all(isinstance(t, Tensor) for t in tensors):
        return tensors                      # not tensors: the argument checks report it
    device = tensors[0].device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return tensors                      # e.g. meta tensors (FLOP counting) have no autocast
    floats = [t for t in tensors if t.is_floating_point()]
    if any(t.dtype == torch.float64 for t in floats):
        return tensors                      # torch's autocast leaves float64 alone; so do we
    if policy == "lower":
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = max((t.dtype for t in floats), key=lambda d: torch.finfo(d).bits)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in tensors)


@custom_op("vidkern::hsda", mutates_args=())
def _hsda_op(q: Tensor, k: Tensor, v: Tensor, grid: list[int], pattern: str, group_ids: Optional[Tensor],
             num_global_heads: int, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return dispatch.get(backend).hsda_forward(q, k, v, tuple(grid), _pattern_arg(pattern, group_ids),
                                              num_global_heads, scale)


@_hsda_op.register_fake
def _(q, k, v, grid, pattern, group_ids, num_global_heads, scale, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return sdpa.token_major_empty(q), q.new_empty(q.shape[:-1], dtype=lse_dtype)   # the backends' strides


@custom_op("vidkern::hsda_backward", mutates_args=())
def _hsda_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      grid: list[int], pattern: str, group_ids: Optional[Tensor], num_global_heads: int,
                      scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.get(backend).hsda_backward(grad_out, q, k, v, out, lse, tuple(grid),
                                               _pattern_arg(pattern, group_ids), num_global_heads, scale)


@_hsda_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, grid, pattern, group_ids, num_global_heads, scale, backend):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _hsda_setup(ctx, inputs, output):
    q, k, v, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, *output)


def _hsda_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _hsda_backward_op(grad_out, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_hsda_op.register_autograd(_hsda_backward, setup_context=_hsda_setup)


def hsda(q: Tensor, k: Tensor, v: Tensor, grid, num_global_heads: Optional[int] = None,
         pattern="checkerboard", scale: Optional[float] = None, backend: Optional[str] = None,
         token_order: str = "natural", strategy: Optional[str] = None) -> Tensor:
    """Head-split sparse-dense attention (FAR, SPEC §1.2).

    Args:
        q, k, v: ``(B, H, N, d)``, any strides (e.g. views of a fused qkv projection),
            float16/bfloat16/float32/float64.
        grid: ``(T, Hp, Wp)`` with ``N == T * Hp * Wp``; may be ``None`` when every head is global.
        num_global_heads: heads ``[0, Hg)`` attend globally; default ``H // 2`` (the paper's 1:1).
        pattern: group rule of the other heads: ``"checkerboard"`` (default), ``"temporal"``,
            ``"global"`` or an int tensor ``(N,)`` of group ids (of the natural-order tokens).
        scale: softmax scale, default ``d ** -0.5``.
        backend: force a backend (else ``$VIDKERN_BACKEND``, else automatic); a forced backend
            (either way) runs every head (strategy ``"fused"``) unless ``strategy`` says otherwise.
        token_order: ``"natural"`` (grid order ``n = (t Hp + h) Wp + w``) or ``"grouped"``: the
            tokens of ``q, k, v`` and of the output are in ``pattern``'s grouped order
            (``patterns.grouped_order``: group 0's tokens first, each group in natural order).
        strategy: ``"fused"``, ``"split"`` or ``"views"`` (grouped order only), see
            :mod:`vidkern.sdpa`; default :func:`vidkern.sdpa.default_strategy`.

    Returns:
        ``(B, H, N, d)``, dtype of ``q``, tokens in ``token_order``:
        ``O[b,h,n] = sum_{m in G_h(n)} softmax_m(scale q[b,h,n].k[b,h,m]) v[b,h,m]``.
    """
    q, k, v = _autocast("lower", q, k, v)
    grid, name, ids, hg, scale = checks.attention(q, k, v, grid, num_global_heads, pattern, scale)
    token_order = checks.choice("token_order", token_order, sdpa.TOKEN_ORDERS)
    if strategy is None:   # a forced backend (argument or $VIDKERN_BACKEND) runs every head
        forced = dispatch.requested_backend(backend) is not None
        strategy = "fused" if forced else sdpa.default_strategy(q.device, token_order)
    strategy = checks.choice("strategy", strategy, sdpa.STRATEGIES)
    if strategy == "views" and token_order != "grouped":
        raise ValueError("strategy='views' needs token_order='grouped' (each group's tokens contiguous); "
                         "got token_order='natural'")
    if strategy == "views":
        sizes = patterns.group_sizes(_pattern_arg(name, ids), grid)
        return sdpa.split(q, k, v, hg, lambda qs, ks, vs: sdpa.block_diagonal(qs, ks, vs, sizes, scale), scale)
    if token_order == "grouped" and hg < q.shape[1]:
        # the fused kernels take grouped tokens as the explicit pattern of sorted ids (cached)
        name, ids = "explicit", patterns.grouped_order(_pattern_arg(name, ids), grid, q.device)[1]
    if strategy == "split":
        return sdpa.split(q, k, v, hg, lambda qs, ks, vs: _hsda_fused(qs, ks, vs, grid, name, ids, 0, scale, backend),
                          scale)
    return _hsda_fused(q, k, v, grid, name, ids, hg, scale, backend)


def _hsda_fused(q, k, v, grid, name, ids, hg, scale, backend):
    """Every head of ``q, k, v`` in one ``vidkern::hsda`` op on the selected backend."""
    be = dispatch.select("hsda", q.device, q.dtype, backend, head_dim=q.shape[-1])
    if be.native_autograd or q.numel() == 0:  # empty inputs: the reference returns empty outputs and grads
        return reference.hsda(q, k, v, grid, hg, _pattern_arg(name, ids), scale)
    return _hsda_op(q, k, v, list(grid), name, ids, hg, scale, be.name)[0]


def sparse_dense_attention(q: Tensor, k: Tensor, v: Tensor, grid, pattern="checkerboard",
                           scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """Sparse-dense attention on every head: :func:`hsda` with ``num_global_heads=0``."""
    return hsda(q, k, v, grid, num_global_heads=0, pattern=pattern, scale=scale, backend=backend)


def group_mean(x: Tensor, grid, pattern="checkerboard", num_groups: Optional[int] = None,
               backend: Optional[str] = None) -> Tensor:
    """Mean of each group's tokens (SPEC §1.4). ``x``: ``(B, N, D)`` -> ``(B, G, D)``.

    ``G`` is 2 for the checkerboard (1 on a 1x1 spatial grid), ``Hp*Wp`` for ``"temporal"``,
    1 for ``"global"``, ``max id + 1`` for an explicit pattern (every id must occur; pass
    ``num_groups`` to skip reading the ids, e.g. under ``torch.compile``).
    """
    x = checks.tensor("x", x, 3, "(B, N, D)")
    grid = checks.grid(grid, x.shape[1])
    name, ids = checks.pattern(pattern, x.shape[1], x.device)
    if num_groups is not None:
        checks.count("num_groups", num_groups, 1, max(x.shape[1], 1))
        if ids is None and num_groups != patterns.num_groups(name, grid):
            raise ValueError(f"num_groups={num_groups} must equal the {name!r} pattern's group count on grid "
                             f"{grid}: {patterns.num_groups(name, grid)}")
    if ids is not None and checks.can_read_values(ids):
        facts = patterns.host_ids(ids)     # cached per pattern tensor: no sync per call
        if num_groups is not None and facts.counts.numel() != num_groups:
            raise ValueError(f"num_groups={num_groups} must equal max id + 1 = {facts.counts.numel()} of the pattern")
        if facts.missing:
            raise ValueError(f"pattern tensor must use every group id in [0, {facts.counts.numel()}); "
                             f"missing {list(facts.missing)}")
    be = dispatch.select("group_mean", x.device, x.dtype, backend)
    return be.group_mean(x, grid, _pattern_arg(name, ids), num_groups)


# =========================================================================== TEAM
@custom_op("vidkern::feature_summary", mutates_args=())
def _feature_summary_op(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return dispatch.get(backend).feature_summary_forward(x)


@_feature_summary_op.register_fake
def _(x, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[0], x.shape[2]), x.new_empty(x.shape[0], 3, x.shape[2], dtype=acc)


@custom_op("vidkern::feature_summary_backward", mutates_args=())
def _feature_summary_backward_op(grad_f: Tensor, x: Tensor, f: Tensor, stats: Tensor, backend: str) -> Tensor:
    return dispatch.get(backend).feature_summary_backward(grad_f, x, f, stats)


@_feature_summary_backward_op.register_fake
def _(grad_f, x, f, stats, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _feature_summary_setup(ctx, inputs, output):
    ctx.backend = inputs[1]
    ctx.save_for_backward(inputs[0], *output)


def _feature_summary_backward(ctx, grad_f, _grad_stats):
    x, f, stats = ctx.saved_tensors
    if grad_f is None:
        return None, None
    return _feature_summary_backward_op(grad_f, x, f, stats, ctx.backend), None


_feature_summary_op.register_autograd(_feature_summary_backward, setup_context=_feature_summary_setup)


def feature_summary(x: Tensor, backend: Optional[str] = None) -> Tensor:
    """TEAM feature summary (FAM, SPEC §2): ``f[b,c] = sum_n softmax_n(X[b,:,c])[n] X[b,n,c]``.

    ``x``: ``(B, N, D)`` float -> ``(B, D)`` in ``x``'s dtype (float32 accumulation).
    """
    checks.team_input(x)
    be = dispatch.select("feature_summary", x.device, x.dtype, backend, channels=x.shape[-1])
    if be.native_autograd or x.numel() == 0:
        return reference.feature_summary(x)
    return _feature_summary_op(x, be.name)[0]


@custom_op("vidkern::team_gate", mutates_args=())
def _team_gate_op(x: Tensor, h: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.get(backend).team_gate_forward(x, h)


@_team_gate_op.register_fake
def _(x, h, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = x.new_empty(x.shape[:2], dtype=acc)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), stats, torch.empty_like(stats)


@custom_op("vidkern::team_gate_backward", mutates_args=())
def _team_gate_backward_op(grad_y: Tensor, x: Tensor, h: Tensor, tok_lse: Tensor, s: Tensor,
                           backend: str) -> tuple[Tensor, Tensor]:
    return dispatch.get(backend).team_gate_backward(grad_y, x, h, tok_lse, s)


@_team_gate_backward_op.register_fake
def _(grad_y, x, h, tok_lse, s, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(h.shape, dtype=h.dtype, device=h.device)


def _team_gate_setup(ctx, inputs, output):
    ctx.backend = inputs[2]
    ctx.save_for_backward(inputs[0], inputs[1], output[1], output[2])


def _team_gate_backward(ctx, grad_y, _grad_lse, _grad_s):
    x, h, tok_lse, s = ctx.saved_tensors
    if grad_y is None:
        return None, None, None
    dx, dh = _team_gate_backward_op(grad_y, x, h, tok_lse, s, ctx.backend)
    return dx, dh, None


_team_gate_op.register_autograd(_team_gate_backward, setup_context=_team_gate_setup)


def team_gate(x: Tensor, h: Tensor, backend: Optional[str] = None) -> Tensor:
    """TEAM gating (FAM gate + TAM, SPEC §2), fused.

    ``x``: ``(B, N, D)``; ``h``: ``(B, D)`` pre-sigmoid output of the FAM MLP (same dtype).
    Returns ``Y = softmax_n(s0)[n] * sigmoid(h) * X`` with
    ``s0[n] = sum_c softmax_c(X'[n])[c] X'[n,c]``, ``X' = sigmoid(h) * X``; shape of ``x``.
    """
    x, h = _autocast("widest", x, h)
    checks.team_input(x, h, needs_h=True)
    be = dispatch.select("team_gate", x.device, x.dtype, backend, channels=x.shape[-1])
    if be.native_autograd or x.numel() == 0:
        return reference.team_gate(x, h)
    return _team_gate_op(x, h, be.name)[0]


# =========================================================================== STTM
@custom_op("vidkern::orthogonal_select", mutates_args=())
def _orthogonal_select_op(x: Tensor, k: int, start: Tensor, backend: str, check_values: bool) -> Tensor:
    if check_values:   # traced by torch.compile: start's values are checked here, on real data
        checks.index_range("start", start, x.shape[1], asynchronous=True)
    return dispatch.get(backend).orthogonal_select(x, k, start)


@_orthogonal_select_op.register_fake
def _(x, k, start, backend, check_values):
    return x.new_empty(x.shape[0], k, dtype=torch.long)


def orthogonal_select(x: Tensor, k: int, start: Tensor, backend: Optional[str] = None) -> Tensor:
    """Greedy most-orthogonal selection (SPEC §3.1 step 2), no gradient.

    ``x``: ``(B, L, D)``; ``start``: int ``(B,)``. Returns int64 ``(B, k)`` in selection order:
    ``start[b]`` first, then each step the unchosen token whose largest ``|cos|`` to the chosen
    tokens is smallest (lowest index on ties). Cosines are computed in float32 (float64 inputs:
    float64); "ties" are equal values in that precision — exact duplicate tokens have
    ``|cos| = 1`` only to within an ulp, so which duplicate comes first can depend on rounding.
    """
    if start is None:
        raise TypeError("start must be an int tensor of shape (B,) (select_meta_tokens picks a default start)")
    checked = checks.selection(x, "k", k, start)
    be = dispatch.select("orthogonal_select", x.device, x.dtype, backend)
    x = x.detach()
    if x.shape[0] == 0:
        return x.new_empty(0, k, dtype=torch.long)
    if be.native_autograd:
        if not checked:
            checks.assert_index_range("start", start, x.shape[1])
        return reference.orthogonal_select(x, k, start)
    return _orthogonal_select_op(x, k, start.long(), be.name, not checked)


def select_meta_tokens(x: Tensor, num_out: int, scores: Optional[Tensor] = None, alpha: float = 1.5,
                       start: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """STTM meta-token selection (SPEC §3.1): int64 ``(B, num_out)``, sorted ascending. No gradient.

    Greedy most-orthogonal selection of ``K`` tokens from ``start`` (default *(choice)*: the token
    of largest norm, the eval rule; STTM draws it at random in training). With attentiveness
    ``scores`` ``(B, L)``, ``K = min(L, ceil(alpha * num_out))`` candidates are selected and the
    ``num_out`` of highest score kept (lowest index on ties); without, ``K = num_out``.
    """
    x = checks.tensor("x", x, 3, "(B, L, D)")
    checks.selection(x, "num_out", num_out, start, scores)
    alpha = checks.finite("alpha", alpha)
    if alpha < 1:
        raise ValueError(f"alpha must be >= 1 (K = ceil(alpha * num_out) candidates, at least num_out), got {alpha}")
    x = x.detach()
    start = reference.default_start(x) if start is None else start
    k = reference.candidate_count(x.shape[1], num_out, scores is not None, alpha)
    cand = orthogonal_select(x, k, start, backend=backend)
    if scores is None:
        return torch.sort(cand, dim=1).values
    return reference.filter_by_scores(cand, scores.detach(), num_out)


@custom_op("vidkern::soft_merge", mutates_args=())
def _soft_merge_op(u: Tensor, idx: Tensor, x: Tensor, e: Tensor, tau: float, backend: str,
                   check_values: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if check_values:   # traced by torch.compile: idx and tau are checked here, on real data
        checks.index_range("idx", idx, x.shape[1], "token indices", asynchronous=True)
        checks.finite("tau", tau, positive=True)
    return dispatch.get(backend).soft_merge_forward(u, idx, x, e, tau)


@_soft_merge_op.register_fake
def _(u, idx, x, e, tau, backend, check_values):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, length = x.shape[:2]
    lp = idx.shape[1]
    return (x.new_empty(b, lp, x.shape[2]), e.new_empty(b, lp, e.shape[2]),
            x.new_empty(b, length, dtype=acc), x.new_empty(b, lp, dtype=acc))


@custom_op("vidkern::soft_merge_backward", mutates_args=())
def _soft_merge_backward_op(grad_a: Tensor, grad_p: Tensor, u: Tensor, idx: Tensor, x: Tensor, e: Tensor,
                            a: Tensor, p: Tensor, row_lse: Tensor, col_sum: Tensor, tau: float,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.get(backend).soft_merge_backward(grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum, tau)


@_soft_merge_backward_op.register_fake
def _(grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum, tau, backend):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (u, x, e))


def _soft_merge_setup(ctx, inputs, output):
    u, idx, x, e, ctx.tau, ctx.backend, _ = inputs
    ctx.save_for_backward(u, idx, x, e, *output)


def _soft_merge_backward(ctx, grad_a, grad_p, _grad_lse, _grad_sum):
    u, idx, x, e, a, p, row_lse, col_sum = ctx.saved_tensors
    grad_a = torch.zeros_like(a) if grad_a is None else grad_a
    grad_p = torch.zeros_like(p) if grad_p is None else grad_p
    du, dx, de = _soft_merge_backward_op(grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum,
                                         ctx.tau, ctx.backend)
    return du, None, dx, de, None, None, None


_soft_merge_op.register_autograd(_soft_merge_backward, setup_context=_soft_merge_setup)


def soft_merge(u: Tensor, idx: Tensor, x: Tensor, e: Tensor, tau: float = 1.0,
               backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """STTM soft merging (SPEC §3.2) without materialising the ``(L, L')`` matrix.

    Args:
        u: ``(B, L, Du)`` normalised ``phi(X)``; the meta features are ``V = u[idx]``.
        idx: int64 ``(B, L')`` meta-token indices (from :func:`select_meta_tokens`).
        x: ``(B, L, D)`` tokens; e: ``(B, L, D)`` or ``(1, L, D)`` position features.
        tau: softmax temperature, finite and positive.

    Returns:
        ``(A, P)``, each ``(B, L', D)``: ``A = C^T X``, ``P = C^T E`` with
        ``C = softmax_tokens(softmax_meta(U V^T / tau))``.
    """
    u, x, e = _autocast("lower", u, x, e)
    tau, checked = checks.merge(u, idx, x, e, tau)
    be = dispatch.select("soft_merge", x.device, x.dtype, backend)
    e = e.expand(x.shape[0], -1, -1)  # autograd sums a broadcast e's gradient back to (1, L, D)
    if be.native_autograd or x.shape[0] == 0:
        if not checked:
            checks.assert_index_range("idx", idx, x.shape[1], "token indices")
        return reference.soft_merge(u, idx, x, e, tau)
    # Under torch.compile idx and tau may be unknown while tracing: the op re-checks them when it runs.
    a, p, _, _ = _soft_merge_op(u, idx, x, e, tau, be.name, not checked or torch.compiler.is_compiling())
    return a, p


# =========================================================================== double backward
def _first_order_only(op: str):
    """Autograd of a ``*_backward`` custom op: second-order gradients are not implemented (SPEC §5).
    Without this, torch would fail with an opaque "no autograd formula" error."""
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"vidkern.{op}: second-order gradients (double backward, e.g. autograd.grad(..., create_graph=True) "
            f"then a second backward) are not implemented by the fused kernels; backend='reference' supports them")
    return backward


for _op, _name in ((_hsda_backward_op, "hsda"), (_feature_summary_backward_op, "feature_summary"),
                   (_team_gate_backward_op, "team_gate"), (_soft_merge_backward_op, "soft_merge")):
    _op.register_autograd(_first_order_only(_name))


# =========================================================================== FLOP formulas
# torch.utils.flop_counter counts a multiply-add as 2 FLOPs; vidkern.flops reports MACs (SPEC §4).
# Only matrix products count; the TEAM ops are elementwise and reductions, so they count nothing.
def attended_pairs(q_shape, grid, pattern, group_ids, num_global_heads) -> int:
    """Sum over heads and batch of the (query, key) pairs attended (SPEC §4: pairs actually attended)."""
    b, h, n, _ = q_shape
    if pattern == "explicit":
        known = patterns.known_host_ids(group_ids)     # e.g. grouped token order's ids, made by vidkern
        if known is not None:
            sizes = known.counts
        elif group_ids.device.type == "meta":
            raise ValueError("FLOPs of an explicit pattern need its group ids; count on real tensors, not meta")
        else:
            sizes = torch.bincount(group_ids.cpu())
    else:
        sizes = torch.bincount(patterns.group_ids(pattern, grid))
    sparse = int((sizes.long() ** 2).sum())
    return b * (num_global_heads * n * n + (h - num_global_heads) * sparse)


# torch (2.14) counts SDPA's CUDA kernels but not ATen's CPU flash kernel, which SDPA runs on CPU:
# hsda's split and views strategies would otherwise count no FLOPs for their SDPA heads there.
from torch.utils.flop_counter import flop_registry as _flop_registry, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default not in _flop_registry:
    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _cpu_sdpa_flops(query, key, value, *args, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


@register_flop_formula(torch.ops.vidkern.hsda, get_raw=True)
def _hsda_flops(q, k, v, grid, pattern, group_ids, num_global_heads, scale, backend, *args, **kwargs) -> int:
    return 4 * q.shape[-1] * attended_pairs(q.shape, grid, pattern, group_ids, num_global_heads)  # QK^T and PV


@register_flop_formula(torch.ops.vidkern.hsda_backward, get_raw=True)
def _hsda_backward_flops(grad_out, q, k, v, out, lse, grid, pattern, group_ids, num_global_heads, scale, backend,
                         *args, **kwargs) -> int:
    # Recompute QK^T, then dV, dP, dQ, dK: five products to the forward's two (FlashAttention's 2.5x).
    return 10 * q.shape[-1] * attended_pairs(q.shape, grid, pattern, group_ids, num_global_heads)


@register_flop_formula(torch.ops.vidkern.soft_merge, get_raw=True)
def _soft_merge_flops(u, idx, x, e, tau, backend, *args, **kwargs) -> int:
    b, length, du = u.shape
    return 2 * b * length * idx.shape[1] * (du + x.shape[-1] + e.shape[-1])     # U V^T, C^T X, C^T E


@register_flop_formula(torch.ops.vidkern.soft_merge_backward, get_raw=True)
def _soft_merge_backward_flops(grad_a, grad_p, u, idx, x, e, *args, **kwargs) -> int:
    b, length, du = u.shape
    # U V^T again; C dA, C dP; X dA^T, E dP^T; dS V, dS^T U.
    return 2 * b * length * idx.shape[1] * (3 * du + 2 * x.shape[-1] + 2 * e.shape[-1])


@register_flop_formula(torch.ops.vidkern.orthogonal_select, get_raw=True)
def _orthogonal_select_flops(x, k, start, backend, *args, **kwargs) -> int:
    b, length, d = x.shape
    return 2 * b * (k - 1) * length * d                                          # one cosine row per step
