"""Triton kernels for STTM's soft merging (SPEC §3.2).

**Soft merge** (``soft_merge``): never holds the ``L x L'`` matrix. With ``S = U V^T / tau``,
``C1 = softmax_meta(S)``, ``W = exp(C1)`` (``C1`` is in [0, 1], so the token-axis softmax needs no
running max), ``C = W / colsum(W)``:
- forward pass 1, per token tile: ``lse[n] = logsumexp_j S[n, j]`` (online over meta tiles);
- forward pass 2, per (meta tile, value-channel tile): stream the token tiles, recompute ``S``,
  accumulate ``colsum``, ``W^T X`` and ``W^T E``; ``A = W^T X / colsum``, ``P = W^T E / colsum``.
- backward (``G = X dA^T + E dP^T``, ``gamma_j = A_j.dA_j + P_j.dP_j``,
  ``dC1 = C (G - gamma)``, ``dS = C1 (dC1 - delta) / tau`` with the per-token
  ``delta[n] = sum_j C1 dC1``): pass 1 per token tile computes ``delta``; pass 2 per (token tile,
  channel tile) accumulates ``dU = dS V``, ``dX = C dA``, ``dE = C dP``; pass 3 per (meta tile,
  channel tile) accumulates ``dV = dS^T U``, which is added to the gathered rows of ``dU``.
  Every pass recomputes ``S`` (and ``G``) from the inputs, so memory stays ``O((L + L') D)``.
fp32 accumulation throughout; fp32 inputs use tf32x3 products (as in the HSDA kernels). The
backward's ``dS`` and ``C`` are far below 1 (``|dS| ~ |dA| sqrt(D) / (L L')``), so before their cast to
the inputs' dtype each row is scaled by an exact power of two (``_dot_rows_scaled``): in float16
they would otherwise be subnormal and lose their digits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import AotSpec, batch_chunks, dot_precision, on_input_device


# =========================================================================== soft merge
@triton.jit
def _rows_dot(PA, ra, ma, sar, sac, PB, rb, mb, sbr, sbc, K, BR: tl.constexpr, BC: tl.constexpr,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """(BR, BC) fp32: dot products of rows ``ra`` of A with rows ``rb`` of B over K columns."""
    acc = tl.zeros([BR, BC], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(PA + ra[:, None] * sar + ok[None, :] * sac, mask=ma[:, None] & (ok < K)[None, :], other=0.0)
        b = tl.load(PB + rb[:, None] * sbr + ok[None, :] * sbc, mask=mb[:, None] & (ok < K)[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return acc


@triton.jit
def _dot_rows_scaled(a, b, PRECISION: tl.constexpr):
    """``a @ b`` in fp32, ``a`` (fp32) cast to ``b``'s dtype for the tensor cores. Each row of ``a`` is
    scaled by a power of two that puts its largest magnitude in [1, 2) before the cast, and the
    product's row is scaled back after: both scalings are exact, so a float16 cast keeps float16's
    *relative* accuracy at any magnitude. (The backward's ``dS ~ |dA| sqrt(D) / (L L')`` is below
    float16's smallest normal, 6e-5, at ordinary sizes, and ``C ~ 1 / L`` at long clips; bfloat16 and
    float32 have float32's range and lose nothing either way.) The powers of two are built from the
    row maximum's exponent bits, not ``exp2``/``log2``, which are approximate on a GPU."""
    expo = (tl.max(tl.abs(a), 1).to(tl.int32, bitcast=True) >> 23) & 0xFF    # biased exponent of the row max
    expo = tl.minimum(tl.maximum(expo, 1), 253)      # zero rows (and absurd ones): keep both factors normal
    scale = ((254 - expo) << 23).to(tl.float32, bitcast=True)                # 2^(127 - expo)
    unscale = (expo << 23).to(tl.float32, bitcast=True)                      # 2^(expo - 127)
    return tl.dot((a * scale[:, None]).to(b.dtype), b, input_precision=PRECISION) * unscale[:, None]


@triton.jit
def _merge_lse_kernel(U, IDX, LSE, sub, sul, sud, L, LP, DU, inv_tau,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """LSE[b, n] = logsumexp_j U[n].U[idx[j]] / tau, online over meta tiles."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    mask_m = offs_m < L
    ub = U + b * sub
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for n0 in range(0, LP, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < LP
        meta = tl.load(IDX + b * LP + offs_n, mask=mask_n, other=0)
        s = _rows_dot(ub, offs_m, mask_m, sul, sud, ub, meta, mask_n, sul, sud, DU, BM, BN, BK, PRECISION) * inv_tau
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(LSE + b * L + offs_m, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def _merge_fwd_kernel(U, IDX, X, E, LSE, A, P, COL, sub, sul, sud, sxb, sxl, sxd, seb, sel, sed, L, LP, DU, D, inv_tau,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Per (meta tile, channel tile): A = W^T X / colsum, P = W^T E / colsum with W = exp(C1),
    streamed over token tiles (A, P, COL contiguous)."""
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    mask_n = offs_n < LP
    mask_d = offs_d < D
    ub = U + b * sub
    meta = tl.load(IDX + b * LP + offs_n, mask=mask_n, other=0)
    col = tl.zeros([BN], tl.float32)
    acc_a = tl.zeros([BN, BD], tl.float32)
    acc_p = tl.zeros([BN, BD], tl.float32)
    for m0 in range(0, L, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < L
        st = _rows_dot(ub, meta, mask_n, sul, sud, ub, offs_m, mask_m, sul, sud, DU, BN, BM, BK, PRECISION) * inv_tau
        lse = tl.load(LSE + b * L + offs_m, mask=mask_m, other=0.0)
        w = tl.exp(tl.exp(st - lse[None, :]))
        w = tl.where(mask_n[:, None] & mask_m[None, :], w, 0.0)
        col += tl.sum(w, 1)
        tile = mask_m[:, None] & mask_d[None, :]
        x = tl.load(X + b * sxb + offs_m[:, None] * sxl + offs_d[None, :] * sxd, mask=tile, other=0.0)
        e = tl.load(E + b * seb + offs_m[:, None] * sel + offs_d[None, :] * sed, mask=tile, other=0.0)
        acc_a += tl.dot(w.to(x.dtype), x, input_precision=PRECISION)
        acc_p += tl.dot(w.to(e.dtype), e, input_precision=PRECISION)
    col_safe = tl.where(mask_n, col, 1.0)
    out = (b * LP + offs_n[:, None]) * D + offs_d[None, :]
    tile = mask_n[:, None] & mask_d[None, :]
    tl.store(A + out, (acc_a / col_safe[:, None]).to(A.dtype.element_ty), mask=tile)
    tl.store(P + out, (acc_p / col_safe[:, None]).to(P.dtype.element_ty), mask=tile)
    if tl.program_id(1) == 0:
        tl.store(COL + b * LP + offs_n, col, mask=mask_n)


@triton.jit
def _merge_tile(U, IDX, X, E, DA, DP, LSE, COL, GAMMA, b, offs_m, mask_m, offs_n, mask_n,
                sub, sul, sud, sxb, sxl, sxd, seb, sel, sed, sab, sal, sad, spb, spl, spd, L, LP, DU, D, inv_tau,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """One (token tile, meta tile) of the backward, recomputed from the inputs: ``(C1, C, dC1)``,
    each (BM, BN) fp32 and zero outside the valid pairs."""
    ub = U + b * sub
    meta = tl.load(IDX + b * LP + offs_n, mask=mask_n, other=0)
    valid = mask_m[:, None] & mask_n[None, :]
    s = _rows_dot(ub, offs_m, mask_m, sul, sud, ub, meta, mask_n, sul, sud, DU, BM, BN, BK, PRECISION) * inv_tau
    lse = tl.load(LSE + b * L + offs_m, mask=mask_m, other=0.0)
    c1 = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
    col = tl.load(COL + b * LP + offs_n, mask=mask_n, other=1.0)
    c = tl.where(valid, tl.exp(c1) / col[None, :], 0.0)
    g = _rows_dot(X + b * sxb, offs_m, mask_m, sxl, sxd, DA + b * sab, offs_n, mask_n, sal, sad, D, BM, BN, BK,
                  PRECISION)
    g += _rows_dot(E + b * seb, offs_m, mask_m, sel, sed, DP + b * spb, offs_n, mask_n, spl, spd, D, BM, BN, BK,
                   PRECISION)
    gamma = tl.load(GAMMA + b * LP + offs_n, mask=mask_n, other=0.0)
    return c1, c, c * (g - gamma[None, :])


@triton.jit
def _merge_bwd_delta_kernel(U, IDX, X, E, DA, DP, LSE, COL, GAMMA, DELTA,
                            sub, sul, sud, sxb, sxl, sxd, seb, sel, sed, sab, sal, sad, spb, spl, spd,
                            L, LP, DU, D, inv_tau,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """DELTA[b, n] = sum_j C1[n, j] dC1[n, j] (the meta-axis softmax's backward statistic)."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    mask_m = offs_m < L
    delta = tl.zeros([BM], tl.float32)
    for n0 in range(0, LP, BN):
        offs_n = n0 + tl.arange(0, BN)
        c1, c, dc1 = _merge_tile(U, IDX, X, E, DA, DP, LSE, COL, GAMMA, b, offs_m, mask_m, offs_n, offs_n < LP,
                                 sub, sul, sud, sxb, sxl, sxd, seb, sel, sed, sab, sal, sad, spb, spl, spd,
                                 L, LP, DU, D, inv_tau, BM, BN, BK, PRECISION)
        delta += tl.sum(c1 * dc1, 1)
    tl.store(DELTA + b * L + offs_m, delta, mask=mask_m)


@triton.jit
def _merge_bwd_tokens_kernel(U, IDX, X, E, DA, DP, LSE, COL, GAMMA, DELTA, DU_OUT, DX, DE,
                             sub, sul, sud, sxb, sxl, sxd, seb, sel, sed, sab, sal, sad, spb, spl, spd,
                             L, LP, DU, D, inv_tau,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                             PRECISION: tl.constexpr):
    """Per (token tile, channel tile): dU = dS V (fp32), dX = C dA, dE = C dP (all contiguous)."""
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    mask_m = offs_m < L
    delta = tl.load(DELTA + b * L + offs_m, mask=mask_m, other=0.0)
    acc_du = tl.zeros([BM, BD], tl.float32)
    acc_dx = tl.zeros([BM, BD], tl.float32)
    acc_de = tl.zeros([BM, BD], tl.float32)
    for n0 in range(0, LP, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < LP
        c1, c, dc1 = _merge_tile(U, IDX, X, E, DA, DP, LSE, COL, GAMMA, b, offs_m, mask_m, offs_n, mask_n,
                                 sub, sul, sud, sxb, sxl, sxd, seb, sel, sed, sab, sal, sad, spb, spl, spd,
                                 L, LP, DU, D, inv_tau, BM, BN, BK, PRECISION)
        ds = c1 * (dc1 - delta[:, None]) * inv_tau
        meta = tl.load(IDX + b * LP + offs_n, mask=mask_n, other=0)
        v = tl.load(U + b * sub + meta[:, None] * sul + offs_d[None, :] * sud,
                    mask=mask_n[:, None] & (offs_d < DU)[None, :], other=0.0)
        da = tl.load(DA + b * sab + offs_n[:, None] * sal + offs_d[None, :] * sad,
                     mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
        dp = tl.load(DP + b * spb + offs_n[:, None] * spl + offs_d[None, :] * spd,
                     mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
        acc_du += _dot_rows_scaled(ds, v, PRECISION)
        acc_dx += _dot_rows_scaled(c, da, PRECISION)
        acc_de += _dot_rows_scaled(c, dp, PRECISION)
    rows = (b * L + offs_m)[:, None]
    tl.store(DU_OUT + rows * DU + offs_d[None, :], acc_du, mask=mask_m[:, None] & (offs_d < DU)[None, :])
    tile = mask_m[:, None] & (offs_d < D)[None, :]
    tl.store(DX + rows * D + offs_d[None, :], acc_dx.to(DX.dtype.element_ty), mask=tile)
    tl.store(DE + rows * D + offs_d[None, :], acc_de.to(DE.dtype.element_ty), mask=tile)


@triton.jit
def _merge_bwd_meta_kernel(U, IDX, X, E, DA, DP, LSE, COL, GAMMA, DELTA, DV,
                           sub, sul, sud, sxb, sxl, sxd, seb, sel, sed, sab, sal, sad, spb, spl, spd,
                           L, LP, DU, D, inv_tau,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                           PRECISION: tl.constexpr):
    """Per (meta tile, channel tile): DV = dS^T U (fp32, contiguous), streamed over token tiles."""
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    mask_n = offs_n < LP
    acc = tl.zeros([BN, BD], tl.float32)
    for m0 in range(0, L, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < L
        c1, c, dc1 = _merge_tile(U, IDX, X, E, DA, DP, LSE, COL, GAMMA, b, offs_m, mask_m, offs_n, mask_n,
                                 sub, sul, sud, sxb, sxl, sxd, seb, sel, sed, sab, sal, sad, spb, spl, spd,
                                 L, LP, DU, D, inv_tau, BM, BN, BK, PRECISION)
        delta = tl.load(DELTA + b * L + offs_m, mask=mask_m, other=0.0)
        ds = c1 * (dc1 - delta[:, None]) * inv_tau                      # (BM, BN)
        u = tl.load(U + b * sub + offs_m[:, None] * sul + offs_d[None, :] * sud,
                    mask=mask_m[:, None] & (offs_d < DU)[None, :], other=0.0)
        acc += _dot_rows_scaled(tl.trans(ds), u, PRECISION)
    tl.store(DV + (b * LP + offs_n[:, None]) * DU + offs_d[None, :], acc,
             mask=mask_n[:, None] & (offs_d < DU)[None, :])


# Tiles of the merge kernels, 4 warps: the largest that compile without spills for sm_80 and
# sm_90 (python -m vidkern.aot); fp32's tf32x3 products need about twice the registers.
MERGE_BLOCKS = {"half": dict(BM=32, BN=32, BK=16, BD=32), "fp32": dict(BM=16, BN=16, BK=16, BD=32)}


def merge_blocks(dtype) -> tuple:
    """(BM, BN, BK, BD) of the merge kernels for inputs of ``dtype``."""
    cfg = MERGE_BLOCKS["fp32" if dtype == torch.float32 else "half"]
    return cfg["BM"], cfg["BN"], cfg["BK"], cfg["BD"]


@on_input_device
def soft_merge_forward(u, idx, x, e, tau):
    """``u (B, L, Du)``, ``idx (B, L')``, ``x, e (B, L, D)`` any strides (``e`` may be a stride-0
    broadcast) -> ``(A, P, row_lse (B, L) fp32, col_sum (B, L') fp32)``."""
    b, length, du = u.shape
    lp, d = idx.shape[1], x.shape[2]
    bm, bn, bk, bd = merge_blocks(x.dtype)
    a = torch.empty((b, lp, d), dtype=x.dtype, device=x.device)
    p = torch.empty((b, lp, d), dtype=e.dtype, device=x.device)
    lse = torch.empty((b, length), dtype=torch.float32, device=x.device)
    col = torch.empty((b, lp), dtype=torch.float32, device=x.device)
    if b == 0:
        return a, p, lse, col
    idx = idx.contiguous()
    prec = dot_precision(x.dtype)
    for bs in batch_chunks(b):
        nb = bs.stop - bs.start
        _merge_lse_kernel[(triton.cdiv(length, bm), nb)](u[bs], idx[bs], lse[bs], *u.stride(), length, lp, du,
                                                         1.0 / tau, BM=bm, BN=bn, BK=bk, PRECISION=prec)
        _merge_fwd_kernel[(triton.cdiv(lp, bn), triton.cdiv(d, bd), nb)](
            u[bs], idx[bs], x[bs], e[bs], lse[bs], a[bs], p[bs], col[bs], *u.stride(), *x.stride(), *e.stride(),
            length, lp, du, d, 1.0 / tau, BM=bm, BN=bn, BK=bk, BD=bd, PRECISION=prec)
    return a, p, lse, col


@on_input_device
def soft_merge_backward(grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum, tau):
    """Returns ``(du, dx, de)`` in the inputs' dtypes (contiguous)."""
    b, length, du_dim = u.shape
    lp, d = idx.shape[1], x.shape[2]
    bm, bn, bk, bd = merge_blocks(x.dtype)
    dx = torch.empty((b, length, d), dtype=x.dtype, device=x.device)
    de = torch.empty((b, length, d), dtype=e.dtype, device=x.device)
    du = torch.empty((b, length, du_dim), dtype=torch.float32, device=x.device)
    if b == 0:
        return du.to(u.dtype), dx, de
    idx = idx.contiguous()
    # sum_n C[n, j] dC[n, j] = A_j.dA_j + P_j.dP_j, since A = C^T X and P = C^T E: (B, L'), tiny
    gamma = ((grad_a.float() * a.float()).sum(-1) + (grad_p.float() * p.float()).sum(-1)).contiguous()
    delta = torch.empty((b, length), dtype=torch.float32, device=x.device)
    dv = torch.empty((b, lp, du_dim), dtype=torch.float32, device=x.device)
    prec = dot_precision(x.dtype)
    common = (*u.stride(), *x.stride(), *e.stride(), *grad_a.stride(), *grad_p.stride(), length, lp, du_dim, d,
              1.0 / tau)
    for bs in batch_chunks(b):
        nb = bs.stop - bs.start
        ins = tuple(t[bs] for t in (u, idx, x, e, grad_a, grad_p, row_lse, col_sum, gamma))
        _merge_bwd_delta_kernel[(triton.cdiv(length, bm), nb)](*ins, delta[bs], *common,
                                                               BM=bm, BN=bn, BK=bk, PRECISION=prec)
        _merge_bwd_tokens_kernel[(triton.cdiv(length, bm), triton.cdiv(max(d, du_dim), bd), nb)](
            *ins, delta[bs], du[bs], dx[bs], de[bs], *common, BM=bm, BN=bn, BK=bk, BD=bd, PRECISION=prec)
        _merge_bwd_meta_kernel[(triton.cdiv(lp, bn), triton.cdiv(du_dim, bd), nb)](
            *ins, delta[bs], dv[bs], *common, BM=bm, BN=bn, BK=bk, BD=bd, PRECISION=prec)
    rows = torch.arange(b, device=x.device)[:, None]
    du[rows, idx] += dv          # meta rows are distinct within a batch row: no accumulation races
    return du.to(u.dtype), dx, de


MERGE_KERNELS = {"merge_lse": _merge_lse_kernel, "merge_fwd": _merge_fwd_kernel,
                 "merge_bwd_delta": _merge_bwd_delta_kernel, "merge_bwd_tokens": _merge_bwd_tokens_kernel,
                 "merge_bwd_meta": _merge_bwd_meta_kernel}


def aot_specs(dtype) -> list:
    """The configurations the soft-merge launchers launch for inputs of ``dtype`` (``vidkern.aot``)."""
    import inspect
    types = dict(IDX="*i64", LSE="*fp32", COL="*fp32", GAMMA="*fp32", DELTA="*fp32", DU_OUT="*fp32", DV="*fp32",
                 L="i32", LP="i32", DU="i32", D="i32", inv_tau="fp32")
    blocks = dict(zip(("BM", "BN", "BK", "BD"), merge_blocks(dtype)))
    specs = []
    for name, fn in MERGE_KERNELS.items():
        params = inspect.signature(fn.fn).parameters
        consts = {k: v for k, v in blocks.items() if k in params}
        consts["PRECISION"] = dot_precision(dtype)
        specs.append(AotSpec("sttm", name, fn, dtype, consts, 4, types))
    return specs
