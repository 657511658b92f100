"""The literal math of SPEC.md, written to be read: ground truth for every backend.

Every function works in any float dtype (float16/bfloat16 attention and soft merging compute in
float32 inside, as SDPA's math path does) and is differentiated by PyTorch autograd (the tests
prove each backward with ``gradcheck`` in float64). Nothing here is fast: attention builds the
full masked ``(N, N)`` score matrix and soft merging the full ``(L, L')`` matrix.
Inputs are assumed valid; the public functions in :mod:`vidkern.ops` check them first.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import patterns
from .metatokens import candidate_count, default_start, filter_by_scores  # SPEC §3.1's choices, shared
from .kernels.limits import NORM_EPS  # noqa: F401  (SPEC §3.1: xh = X / max(||X||, eps))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 products and softmaxes run in float32 inside, as SDPA's math path does: an
    fp16 score ``q.k`` or ``U V^T / tau`` overflows 65504 at ordinary sizes, which the fused
    kernels (fp32 accumulators) and SDPA do not. Results are rounded back to the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------- FAR (SPEC §1)
def hsda(q, k, v, grid, num_global_heads=None, pattern="checkerboard", scale=None):
    """Head-split sparse-dense attention, SPEC §1.2.

    ``q, k, v``: ``(B, H, N, d)``. Heads ``[0, Hg)`` attend globally, heads ``[Hg, H)`` only to
    tokens of their own group under ``pattern``:
    ``O[b,h,n] = sum_{m in G(n)} softmax_m(scale * q[b,h,n] . k[b,h,m]) v[b,h,m]``.
    Returns ``(B, H, N, d)`` in the input dtype.
    """
    _, num_heads, n, d = q.shape
    dtype, wide = q.dtype, _compute_dtype(q.dtype)
    q, k, v = q.to(wide), k.to(wide), v.to(wide)
    hg = num_heads // 2 if num_global_heads is None else num_global_heads
    scale = d ** -0.5 if scale is None else scale
    ids = patterns.group_ids(pattern, grid, q.device) if grid is not None else torch.zeros(n, dtype=torch.long, device=q.device)
    same_group = ids[:, None] == ids[None, :]                                   # (N, N)
    is_global = torch.arange(num_heads, device=q.device) < hg                   # (H,)
    allowed = is_global[:, None, None] | same_group[None]                       # (H, N, N)
    scores = scale * q @ k.transpose(-1, -2)                                    # (B, H, N, N)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(dtype)


def group_mean(x, grid, pattern="checkerboard", num_groups=None):
    """Mean of the tokens of each group, SPEC §1.4. ``x``: ``(B, N, D)`` -> ``(B, G, D)``."""
    ids = patterns.group_ids(pattern, grid, x.device)
    groups = num_groups or patterns.num_groups(pattern, grid)
    # the one-hot matrix by comparison: F.one_hot checks the ids' range on the host (a sync on CUDA)
    one_hot = (ids[:, None] == torch.arange(groups, device=x.device)).to(x.dtype)          # (N, G)
    return torch.einsum("bnd,ng->bgd", x, one_hot / one_hot.sum(0))


# --------------------------------------------------------------------------- TEAM (SPEC §2)
def feature_summary(x):
    """FAM summary: ``f[b,c] = sum_n softmax_n(X[b,:,c])[n] * X[b,n,c]``. ``(B, N, D) -> (B, D)``."""
    return (torch.softmax(x, dim=1) * x).sum(dim=1)


def team_gate(x, h):
    """FAM gate then TAM (SPEC §2). ``x``: ``(B, N, D)``, ``h``: ``(B, D)`` pre-sigmoid -> ``(B, N, D)``.

    ``X' = sigmoid(h) * X``; ``s0[n] = sum_c softmax_c(X'[n])[c] X'[n,c]``;
    ``Y[n] = softmax_n(s0)[n] * X'[n]``.
    """
    xp = torch.sigmoid(h)[:, None, :] * x
    s0 = (torch.softmax(xp, dim=-1) * xp).sum(dim=-1)                           # (B, N)
    return torch.softmax(s0, dim=-1)[:, :, None] * xp


# --------------------------------------------------------------------------- STTM (SPEC §3)
def normalize(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def orthogonal_select(x, k, start):
    """Greedy most-orthogonal selection, SPEC §3.1 step 2: ``(B, L, D) -> (B, k)`` in pick order.

    Start at ``start[b]``; then repeatedly pick the unchosen token minimising the largest
    ``|cos|`` to the chosen ones, lowest index on ties. Cosines in float32 for float16/bfloat16
    inputs (as every backend computes them; bf16 cosines would break near-ties at random).
    """
    xh = normalize(x.to(_compute_dtype(x.dtype)))
    rows = []
    for b in range(x.shape[0]):
        cos = (xh[b] @ xh[b].T).abs()                                           # (L, L)
        chosen = [int(start[b])]
        for _ in range(k - 1):
            worst = cos[:, chosen].max(dim=1).values.clone()
            worst[chosen] = math.inf
            chosen.append(int(torch.argmin(worst)))                             # first minimum = lowest index
        rows.append(chosen)
    return torch.tensor(rows, dtype=torch.long, device=x.device).reshape(x.shape[0], k)


def select_meta_tokens(x, num_out, scores=None, alpha=1.5, start=None):
    """SPEC §3.1: indices ``(B, num_out)`` int64, sorted ascending. No gradient."""
    with torch.no_grad():
        start = default_start(x) if start is None else start
        k = candidate_count(x.shape[1], num_out, scores is not None, alpha)
        cand = orthogonal_select(x, k, start)
        if scores is None:
            return torch.sort(cand, dim=1).values
        return filter_by_scores(cand, scores, num_out)


def soft_merge(u, idx, x, e, tau=1.0):
    """Soft merging, SPEC §3.2. ``u``: ``(B, L, Du)`` normalised ``phi(X)``; ``idx``: ``(B, L')``;
    ``x``: ``(B, L, D)``; ``e``: ``(B or 1, L, D)``. Returns ``(A, P)``, each ``(B, L', D)``.

    ``S = U V^T / tau`` with ``V = U[idx]``; ``C1 = softmax_{meta}(S)``; ``C = softmax_{tokens}(C1)``;
    ``A = C^T X``; ``P = C^T E``.
    """
    dtype, wide = x.dtype, _compute_dtype(x.dtype)
    u, x, e = u.to(wide), x.to(wide), e.to(wide)
    meta = torch.gather(u, 1, idx[:, :, None].expand(-1, -1, u.shape[-1]))    # (B, L', Du)
    s = u @ meta.transpose(1, 2) / tau                                          # (B, L, L')
    c = torch.softmax(torch.softmax(s, dim=-1), dim=-2)
    e = e.expand(x.shape[0], -1, -1)
    return (c.transpose(1, 2) @ x).to(dtype), (c.transpose(1, 2) @ e).to(dtype)
