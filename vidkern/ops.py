"""Public ops: the functions users call.

A public function applies its autocast policy, checks its arguments (:mod:`vidkern.checks`) and
hands them to :func:`vidkern.library.run`, which asks :mod:`vidkern.dispatch` for a backend and
runs either the reference (differentiated by autograd) or the op's ``vidkern::`` custom op,
whose forward and backward are the backend's own. Everything about the custom ops — schema,
fake, saved tensors, autograd, FLOP formula, backend interface — is declared once per op in
:mod:`vidkern.library`; ``torch.compile(fullgraph=True)`` traces them through their fakes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends as _backends  # noqa: F401  (registers the backends)
from . import checks, dispatch, library, metatokens, patterns, sdpa


_pattern_arg = library.pattern_arg


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
    grouped_sparse = token_order == "grouped" and hg < q.shape[1]
    # the sparse groups' sizes, in grouped order: the strategy rule and the views strategy read them
    # (a pattern tensor's sizes are its values: unknown while torch.compile traces)
    known = not grouped_sparse or patterns.static_sizes(_pattern_arg(name, ids))
    sizes = patterns.group_sizes(_pattern_arg(name, ids), grid) if grouped_sparse and known else ()
    if strategy is None:   # a forced backend (argument or $VIDKERN_BACKEND) runs every head
        if dispatch.requested_backend(backend, "hsda") is not None:
            strategy = "fused"
        elif not known:
            strategy = "split"
        else:
            strategy = sdpa.default_strategy(q.device, token_order, max(sizes, default=None), q.dtype)
    strategy = checks.choice("strategy", strategy, sdpa.STRATEGIES)
    if strategy == "views" and token_order != "grouped":
        raise ValueError("strategy='views' needs token_order='grouped' (each group's tokens contiguous); "
                         "got token_order='natural'")
    if strategy == "views" and not known:
        raise ValueError("strategy='views' needs the groups' sizes, which a pattern tensor's values give and "
                         "torch.compile cannot read while tracing (nor can a meta tensor); use a named pattern, "
                         "or strategy='split' or 'fused'")
    if q.shape[1] == 0:                      # no heads: an empty op (the reference, as for B = 0)
        return _hsda_fused(q, k, v, grid, name, ids, hg, scale, backend)
    if strategy == "views":
        out = sdpa.split(q, k, v, hg, lambda qs, ks, vs: sdpa.block_diagonal(qs, ks, vs, sizes, scale), scale)
        return _first_order_only(out)
    if grouped_sparse:
        # the fused kernels take grouped tokens as the explicit pattern of sorted ids (cached)
        name, ids = "explicit", patterns.grouped_order(_pattern_arg(name, ids), grid, q.device)[1]
    if strategy == "split":
        out = sdpa.split(q, k, v, hg, lambda qs, ks, vs: _hsda_fused(qs, ks, vs, grid, name, ids, 0, scale, backend),
                         scale)
        return _first_order_only(out)
    return _hsda_fused(q, k, v, grid, name, ids, hg, scale, backend)


def _first_order_only(out: Tensor) -> Tensor:
    """SDPA strategies: a double backward raises the documented NotImplementedError (SPEC §5), not
    the error of whichever SDPA kernel ran (``library.FirstOrderOnly``). Eager autograd only:
    ``torch.compile`` has no double backward of its own; ``backend="reference"`` supports it."""
    if not out.requires_grad or torch.compiler.is_compiling():
        return out
    return library.FirstOrderOnly.apply(out, "hsda")


def _hsda_fused(q, k, v, grid, name, ids, hg, scale, backend):
    """Every head of ``q, k, v`` in one ``vidkern::hsda`` op on the selected backend."""
    return library.run("hsda", backend, q=q, k=k, v=v, grid=list(grid), pattern=name, group_ids=ids,
                       num_global_heads=hg, scale=scale)


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
    if ids is not None and not checks.can_read_values(ids) and ids.device.type != "meta":
        if num_groups is None:
            raise ValueError("num_groups is required for a pattern tensor under torch.compile: the group count is "
                             "max id + 1, which tracing cannot read")
        checks.assert_group_ids(ids, num_groups)   # traced: the rule below as run-time asserts
    elif ids is not None and checks.can_read_values(ids):
        facts = patterns.host_ids(ids)     # cached per pattern tensor: no sync per call
        if num_groups is not None and facts.num_groups != num_groups:
            raise ValueError(f"num_groups={num_groups} must equal max id + 1 = {facts.num_groups} of the pattern")
        if facts.missing:
            shown = facts.missing_examples()
            more = f" and {facts.missing - len(shown)} more" if facts.missing > len(shown) else ""
            raise ValueError(f"pattern tensor must use every group id in [0, {facts.num_groups}); "
                             f"missing {shown}{more}")
    be = dispatch.select(dispatch.Inputs("group_mean", x.device, x.dtype), backend)
    return be.group_mean(x, grid, _pattern_arg(name, ids), num_groups)


# =========================================================================== TEAM
def feature_summary(x: Tensor, backend: Optional[str] = None) -> Tensor:
    """TEAM feature summary (FAM, SPEC §2): ``f[b,c] = sum_n softmax_n(X[b,:,c])[n] X[b,n,c]``.

    ``x``: ``(B, N, D)`` float -> ``(B, D)`` in ``x``'s dtype (float32 accumulation).
    """
    checks.team_input(x)
    return library.run("feature_summary", backend, x=x)


def team_gate(x: Tensor, h: Tensor, backend: Optional[str] = None) -> Tensor:
    """TEAM gating (FAM gate + TAM, SPEC §2), fused.

    ``x``: ``(B, N, D)``; ``h``: ``(B, D)`` pre-sigmoid output of the FAM MLP (same dtype).
    Returns ``Y = softmax_n(s0)[n] * sigmoid(h) * X`` with
    ``s0[n] = sum_c softmax_c(X'[n])[c] X'[n,c]``, ``X' = sigmoid(h) * X``; shape of ``x``.
    """
    x, h = _autocast("widest", x, h)
    checks.team_input(x, h, needs_h=True)
    return library.run("team_gate", backend, x=x, h=h)


# =========================================================================== STTM
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
    return _orthogonal_select(x.detach(), k, start, backend, checked)


def _orthogonal_select(x, k, start, backend, checked: bool):
    """:func:`orthogonal_select` after its checks (``checked``: ``start``'s values were read)."""
    return library.run("orthogonal_select", backend, x=x, k=k, start=start.long(), check_values=not checked)


def select_meta_tokens(x: Tensor, num_out: int, scores: Optional[Tensor] = None, alpha: float = 1.5,
                       start: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """STTM meta-token selection (SPEC §3.1): int64 ``(B, num_out)``, sorted ascending. No gradient.

    Greedy most-orthogonal selection of ``K`` tokens from ``start`` (default *(choice)*: the token
    of largest norm, the eval rule; STTM draws it at random in training). With attentiveness
    ``scores`` ``(B, L)``, ``K = min(L, ceil(alpha * num_out))`` candidates are selected and the
    ``num_out`` of highest score kept (lowest index on ties); without, ``K = num_out``.
    """
    x = checks.tensor("x", x, 3, "(B, L, D)")
    checked = checks.selection(x, "num_out", num_out, start, scores)
    alpha = checks.finite("alpha", alpha)
    if alpha < 1:
        raise ValueError(f"alpha must be >= 1 (K = ceil(alpha * num_out) candidates, at least num_out), got {alpha}")
    x = x.detach()
    if start is None:
        start, checked = metatokens.default_start(x), True    # in range by construction
    k = metatokens.candidate_count(x.shape[1], num_out, scores is not None, alpha)   # in [num_out, L]
    cand = _orthogonal_select(x, k, start, backend, checked)
    if scores is None:
        return torch.sort(cand, dim=1).values
    return metatokens.filter_by_scores(cand, scores.detach(), num_out)


def soft_merge(u: Tensor, idx: Tensor, x: Tensor, e: Tensor, tau: float = 1.0,
               backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """STTM soft merging (SPEC §3.2) without materialising the ``(L, L')`` matrix.

    Args:
        u: ``(B, L, Du)`` normalised ``phi(X)``; the meta features are ``V = u[idx]``.
        idx: int64 ``(B, L')`` meta-token indices (from :func:`select_meta_tokens`), distinct
            within each row (SPEC §3.2; a repeat is refused: a ``ValueError``, on CUDA a
            device-side assert, no host sync).
        x: ``(B, L, D)`` tokens; e: ``(B, L, D)`` or ``(1, L, D)`` position features.
        tau: softmax temperature, finite and positive.

    Returns:
        ``(A, P)``, each ``(B, L', D)``: ``A = C^T X``, ``P = C^T E`` with
        ``C = softmax_tokens(softmax_meta(U V^T / tau))``.
    """
    u, x, e = _autocast("lower", u, x, e)
    tau, checked = checks.merge(u, idx, x, e, tau)
    e = e.expand(x.shape[0], -1, -1)  # autograd sums a broadcast e's gradient back to (1, L, D)
    # Under torch.compile idx and tau may be unknown while tracing: the op re-checks them when it runs.
    return library.run("soft_merge", backend, u=u, idx=idx, x=x, e=e, tau=tau,
                       check_values=not checked or torch.compiler.is_compiling())
