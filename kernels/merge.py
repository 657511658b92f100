"""Triton kernels for STTM's soft merging (SPEC §3.2), designed against the work model
(``vidkern.work.merge``: every launch's bytes and MACs, counted).

**Soft merge** (``soft_merge``), with ``S = U V^T / tau`` (``V = U[idx]``), ``C1 = softmax_meta(S)``,
``W = exp(C1)`` (``C1`` is in [0, 1], so the token-axis softmax needs no running max), ``C = W /
colsum(W)``, ``A = C^T X``, ``P = C^T E``; backward with ``G = X dA^T + E dP^T``, ``gamma_j = A_j.dA_j +
P_j.dP_j`` (``= sum_n C G``), ``dC1 = C (G - gamma)``, ``delta_n = sum_j C1 dC1``, ``dS = C1 (dC1 -
delta) / tau``, ``dU = dS V + scatter_idx(dS^T U)``, ``dX = C dA``, ``dE = C dP``. Two paths, by
``kernels.limits.merge_materialises``:

**Materialised** (``L' <= 2 D``, sttm_vit_b's stages): the ``(B, L, L')`` matrices are then no
larger than a small multiple of the ``(B, L, D)`` tokens (memory stays ``O((L + L') D)``), so every
product the math needs is one batched cuBLAS GEMM, issued once — forward ``S``, ``A``, ``P`` (3U,
``U = B L L' D`` MACs), backward ``S``, ``X dA^T``, ``E dP^T``, ``dS V``, ``dS^T U``, ``dX``, ``dE`` (7U)
— at the tile sizes and wgmma rate cuBLAS picks, and two row kernels do the softmaxes between
them: ``_merge_rows_fwd_kernel`` (one pass for the log-sum-exps and column sums, one for ``C``) and
``_merge_rows_bwd_kernel`` (``dS`` and ``C``), each holding whole rows of ``L'`` scores. The 16-bit
GEMM operands ``C`` and ``dS`` are tiny (``C ~ 1 / L``; ``dS ~ |dA| sqrt(D) / (L L')``): float16's are
scaled by ``half_scale`` (a power of two near ``L``) and the float32 products scaled back. float32
inputs get cuBLAS's float32 GEMMs (TF32 only where the caller allows it, ``torch.backends.cuda.
matmul.allow_tf32``; the streamed kernels use tf32x3). On the model (H200, bf16) sttm_vit_b's stage 2 (B = 32, 784 -> 392, D = 768) takes 123 + 266 us forward
and backward, 49% of the tensor-core peak for its useful products, where the streamed kernels
below take 646 + 1,160 us (11%: their 16-row tiles re-read ``X`` and ``E`` from L2 per meta tile).

**Streamed** (wider merges: the long clip, ``L' = 8 D``) never holds the ``L x L'`` matrix.

*Streamed design.* Units: ``U = L L' D`` MACs per problem (``Du = D``). The products the math needs once
(``useful_macs``) are forward ``S + A + P`` = 3U and backward ``S + G + dU + dX + dE + dV`` = 7U.
``S`` (and ``G``) are recomputed per pass from the inputs, since memory must stay ``O((L + L') D)``,
so the passes are what costs: each program computes its ``S``/``G`` tile **once** and keeps *all*
the output channels of its tile resident — ``NC`` (constexpr, one of ``merge_chunks``: 1, 3 or 6) separate
``(16, CH)`` fp32 accumulators per output, ``CH = 128`` channels each (exact for ``D`` = 384, 768:
no power-of-two padding of the channel axis). Only a ``D`` wider than 6 chunks (768) splits the
channels over programs (``channel_split``), each recomputing ``S``/``G``. The explicit
accumulator slots (``SLOTS``) are unrolled with constexpr guards; the chunk loads share one offset
tensor (``_tile``) so the compiler does not hoist a pointer tensor per chunk out of the loops. Tiles are 16 x 16 (the
smallest ``tl.dot``) to keep both the registers and the ragged-tile padding small (196 -> 98:
208 x 112 computed for 196 x 98, 1.21x).

- forward pass 1 (``_merge_lse_kernel``, per token tile): ``lse[n] = logsumexp_j S[n, j]``, online
  over meta tiles (1U);
- forward pass 2 (``_merge_fwd_kernel``, per meta tile): stream the token tiles, ``S`` once,
  accumulate ``colsum``, ``W^T X`` and ``W^T E`` over all channels (1U + 2U). Total 4U (vs about
  27U at D = 768 when ``S`` was recomputed per 32-channel tile).
- backward pass 1 (``_merge_bwd_tokens_kernel``, per token tile, one sweep over the meta tiles):
  ``S`` and ``G`` once (3U); ``delta`` accumulates; and ``dU`` without a separate ``delta`` pass:
  with ``r`` = the first meta tile's ``C1``-weighted mean of ``dC1`` (an estimate of ``delta``,
  per token) it accumulates ``R = C1 (dC1 - r) V`` and ``Q = C1 V`` (2U) and finishes
  ``dU = (R - (delta - r) Q) / tau`` — exact algebra. The estimate keeps the 16-bit operand
  ``C1 (dC1 - r)`` the size of ``dS`` (a common offset of ``dC1`` over the meta axis, the
  cancellation a plain ``C1 dC1 V - delta C1 V`` suffers, cancels in it), and the correction
  ``(delta - r) Q`` is as small as the estimate is good (16 meta tokens' mean against all
  ``L'``'s; with ``L' <= 16`` it is exact); writes ``delta`` and ``dU`` (fp32). 5U.
- backward pass 2 (``_merge_bwd_dx_kernel``, per token tile): ``S`` once (1U), ``dX = C dA``,
  ``dE = C dP`` (2U). A pass of its own because two more resident accumulators per chunk do not
  fit the registers at D = 768 (``vidkern.aot``), and it needs no ``G``. 3U.
- backward pass 3 (``_merge_bwd_meta_kernel``, per meta tile): ``S``, ``G`` once, ``dS`` (with
  ``delta``), ``dV = dS^T U`` (1U), added in place to the rows ``idx`` of ``dU`` (meta rows are
  distinct within a problem: no races). 4U. Backward total 12U (vs 151U; the classic three
  passes — delta, token, meta — would be 13U).

fp32 accumulation throughout; fp32 inputs use tf32x3 products (as in the HSDA kernels) and keep
fewer chunks resident (their products need about twice the registers). The backward's ``dS``,
``C`` and ``C1`` operands are far below 1 (``|dS| ~ |dA| sqrt(D) / (L L')``), so before their cast
to the inputs' dtype each row is scaled by an exact power of two (``_scaled``): in float16 they
would otherwise be subnormal and lose their digits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Config, batch_chunks, dot_precision, for_triton, on_input_device
from .limits import MERGE_MATERIALISE_MAX_META, dtype_class, merge_materialises


# =========================================================================== helpers
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
def _scaled(a, dtype: tl.constexpr):
    """``(a * 2^-e, 2^e)`` per row, the first cast to ``dtype``, for ``tl.dot(a', b) * unscale``: each
    row of ``a`` (fp32) is scaled by a power of two that puts its largest magnitude in [1, 2) before
    the cast, and the product's row is scaled back after. Both scalings are exact, so a float16 cast
    keeps float16's *relative* accuracy at any magnitude (the backward's ``dS`` is below float16's
    smallest normal, 6e-5, at ordinary sizes, and ``C ~ 1 / L`` at long clips; bfloat16 and float32
    have float32's range and lose nothing either way). The powers of two are built from the row
    maximum's exponent bits, not ``exp2``/``log2``, which are approximate on a GPU."""
    expo = (tl.max(tl.abs(a), 1).to(tl.int32, bitcast=True) >> 23) & 0xFF    # biased exponent of the row max
    expo = tl.minimum(tl.maximum(expo, 1), 253)      # zero rows (and absurd ones): keep both factors normal
    scale = ((254 - expo) << 23).to(tl.float32, bitcast=True)                # 2^(127 - expo)
    unscale = (expo << 23).to(tl.float32, bitcast=True)                      # 2^(expo - 127)
    return (a * scale[:, None]).to(dtype), unscale


@triton.jit
def _tile(PTR, rows, mask_rows, srow, scol, c0, NCOL, CH: tl.constexpr):
    """Rows ``rows`` x channels ``[c0, c0 + CH)`` of a matrix with ``NCOL`` columns (zeros outside).
    The chunk's offset is a scalar added to offsets every chunk shares: per-chunk pointer tensors
    would be hoisted out of the token loop, one set per chunk, and spill."""
    offs = tl.arange(0, CH)
    return tl.load(PTR + c0 * scol + (rows[:, None] * srow + offs[None, :] * scol),
                   mask=mask_rows[:, None] & (offs < NCOL - c0)[None, :], other=0.0)


@triton.jit
def _put(PTR, val, rows, mask_rows, c0, NCOL, CH: tl.constexpr):
    """Store a (rows, CH) chunk into a contiguous matrix of ``NCOL`` columns."""
    offs = c0 + tl.arange(0, CH)
    tl.store(PTR + rows[:, None] * NCOL + offs[None, :], val.to(PTR.dtype.element_ty),
             mask=mask_rows[:, None] & (offs < NCOL)[None, :])


@triton.jit
def _fwd_chunk(a, p, wx, we, XB, EB, offs_m, mask_m, sxl, sxd, sel, sed, c0, D, CH: tl.constexpr,
               PRECISION: tl.constexpr):
    """One channel chunk of ``A += W^T X``, ``P += W^T E`` (``W`` in [1, e]: no scaling needed)."""
    a += tl.dot(wx, _tile(XB, offs_m, mask_m, sxl, sxd, c0, D, CH), input_precision=PRECISION)
    p += tl.dot(we, _tile(EB, offs_m, mask_m, sel, sed, c0, D, CH), input_precision=PRECISION)
    return a, p


@triton.jit
def _fwd_store(A, P, a, p, inv_col, rows, mask_n, c0, D, CH: tl.constexpr):
    _put(A, a * inv_col[:, None], rows, mask_n, c0, D, CH)
    _put(P, p * inv_col[:, None], rows, mask_n, c0, D, CH)


@triton.jit
def _tok_chunk(u, q, dsw, dsu, c1w, c1u, UB, meta, mask_n, sul, sud, c0, DU, CH: tl.constexpr,
               PRECISION: tl.constexpr):
    """One channel chunk of the token pass: ``R += C1 (dC1 - r) V``, ``Q += C1 V`` (one load of the
    ``V`` chunk)."""
    v = _tile(UB, meta, mask_n, sul, sud, c0, DU, CH)
    u += tl.dot(dsw, v, input_precision=PRECISION) * dsu[:, None]
    q += tl.dot(c1w, v, input_precision=PRECISION) * c1u[:, None]
    return u, q


@triton.jit
def _dx_chunk(x, e, cw, cu, DAB, DPB, offs_n, mask_n, sal, sad, spl, spd, c0, D, CH: tl.constexpr,
              PRECISION: tl.constexpr):
    """One channel chunk of ``dX += C dA``, ``dE += C dP``."""
    da = _tile(DAB, offs_n, mask_n, sal, sad, c0, D, CH)
    x += tl.dot(cw.to(da.dtype), da, input_precision=PRECISION) * cu[:, None]
    dp = _tile(DPB, offs_n, mask_n, spl, spd, c0, D, CH)
    e += tl.dot(cw.to(dp.dtype), dp, input_precision=PRECISION) * cu[:, None]
    return x, e


@triton.jit
def _dx_store(DX, DE, x, e, rows, mask_m, c0, D, CH: tl.constexpr):
    _put(DX, x, rows, mask_m, c0, D, CH)
    _put(DE, e, rows, mask_m, c0, D, CH)


@triton.jit
def _tok_store(DU_OUT, u, q, corr, inv_tau, rows, mask_m, c0, DU, CH: tl.constexpr):
    _put(DU_OUT, (u - corr[:, None] * q) * inv_tau, rows, mask_m, c0, DU, CH)


@triton.jit
def _meta_chunk(v, dsw, dsu, UB, offs_m, mask_m, sul, sud, c0, DU, CH: tl.constexpr, PRECISION: tl.constexpr):
    return v + tl.dot(dsw, _tile(UB, offs_m, mask_m, sul, sud, c0, DU, CH), input_precision=PRECISION) * dsu[:, None]


@triton.jit
def _meta_add(DU_OUT, v, rows, mask_n, c0, DU, CH: tl.constexpr):
    """``dU[rows] += v`` for one chunk (the rows are distinct: no other program touches them)."""
    offs = c0 + tl.arange(0, CH)
    ptr = DU_OUT + rows[:, None] * DU + offs[None, :]
    mask = mask_n[:, None] & (offs < DU)[None, :]
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + v, mask=mask)


# =========================================================================== forward
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
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr, NC: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Per (meta tile, channel group of ``NC`` chunks): ``A = W^T X / colsum``, ``P = W^T E / colsum``
    with ``W = exp(C1)``, streamed over token tiles, ``S`` computed once per (meta, token) tile
    (A, P, COL contiguous)."""
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    c0 = tl.program_id(1) * (NC * CH)
    mask_n = offs_n < LP
    ub = U + b * sub
    XB = X + b * sxb
    EB = E + b * seb
    meta = tl.load(IDX + b * LP + offs_n, mask=mask_n, other=0)
    col = tl.zeros([BN], tl.float32)
    a0, p0 = tl.zeros([BN, CH], tl.float32), tl.zeros([BN, CH], tl.float32)
    a1, p1 = tl.zeros([BN, CH], tl.float32), tl.zeros([BN, CH], tl.float32)
    a2, p2 = tl.zeros([BN, CH], tl.float32), tl.zeros([BN, CH], tl.float32)
    a3, p3 = tl.zeros([BN, CH], tl.float32), tl.zeros([BN, CH], tl.float32)
    a4, p4 = tl.zeros([BN, CH], tl.float32), tl.zeros([BN, CH], tl.float32)
    a5, p5 = tl.zeros([BN, CH], tl.float32), tl.zeros([BN, CH], tl.float32)
    a6, p6 = tl.zeros([BN, CH], tl.float32), tl.zeros([BN, CH], tl.float32)
    a7, p7 = tl.zeros([BN, CH], tl.float32), tl.zeros([BN, CH], tl.float32)
    for m0 in range(0, L, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < L
        st = _rows_dot(ub, meta, mask_n, sul, sud, ub, offs_m, mask_m, sul, sud, DU, BN, BM, BK, PRECISION) * inv_tau
        lse = tl.load(LSE + b * L + offs_m, mask=mask_m, other=0.0)
        w = tl.exp(tl.exp(st - lse[None, :]))
        w = tl.where(mask_n[:, None] & mask_m[None, :], w, 0.0)
        col += tl.sum(w, 1)
        wx = w.to(X.dtype.element_ty)
        we = w.to(E.dtype.element_ty)
        a0, p0 = _fwd_chunk(a0, p0, wx, we, XB, EB, offs_m, mask_m, sxl, sxd, sel, sed, c0 + 0 * CH, D, CH, PRECISION)
        if NC > 1:
            a1, p1 = _fwd_chunk(a1, p1, wx, we, XB, EB, offs_m, mask_m, sxl, sxd, sel, sed, c0 + 1 * CH, D, CH, PRECISION)
        if NC > 2:
            a2, p2 = _fwd_chunk(a2, p2, wx, we, XB, EB, offs_m, mask_m, sxl, sxd, sel, sed, c0 + 2 * CH, D, CH, PRECISION)
        if NC > 3:
            a3, p3 = _fwd_chunk(a3, p3, wx, we, XB, EB, offs_m, mask_m, sxl, sxd, sel, sed, c0 + 3 * CH, D, CH, PRECISION)
        if NC > 4:
            a4, p4 = _fwd_chunk(a4, p4, wx, we, XB, EB, offs_m, mask_m, sxl, sxd, sel, sed, c0 + 4 * CH, D, CH, PRECISION)
        if NC > 5:
            a5, p5 = _fwd_chunk(a5, p5, wx, we, XB, EB, offs_m, mask_m, sxl, sxd, sel, sed, c0 + 5 * CH, D, CH, PRECISION)
        if NC > 6:
            a6, p6 = _fwd_chunk(a6, p6, wx, we, XB, EB, offs_m, mask_m, sxl, sxd, sel, sed, c0 + 6 * CH, D, CH, PRECISION)
        if NC > 7:
            a7, p7 = _fwd_chunk(a7, p7, wx, we, XB, EB, offs_m, mask_m, sxl, sxd, sel, sed, c0 + 7 * CH, D, CH, PRECISION)
    inv_col = 1.0 / tl.where(mask_n, col, 1.0)
    rows = b * LP + offs_n
    _fwd_store(A, P, a0, p0, inv_col, rows, mask_n, c0 + 0 * CH, D, CH)
    if NC > 1:
        _fwd_store(A, P, a1, p1, inv_col, rows, mask_n, c0 + 1 * CH, D, CH)
    if NC > 2:
        _fwd_store(A, P, a2, p2, inv_col, rows, mask_n, c0 + 2 * CH, D, CH)
    if NC > 3:
        _fwd_store(A, P, a3, p3, inv_col, rows, mask_n, c0 + 3 * CH, D, CH)
    if NC > 4:
        _fwd_store(A, P, a4, p4, inv_col, rows, mask_n, c0 + 4 * CH, D, CH)
    if NC > 5:
        _fwd_store(A, P, a5, p5, inv_col, rows, mask_n, c0 + 5 * CH, D, CH)
    if NC > 6:
        _fwd_store(A, P, a6, p6, inv_col, rows, mask_n, c0 + 6 * CH, D, CH)
    if NC > 7:
        _fwd_store(A, P, a7, p7, inv_col, rows, mask_n, c0 + 7 * CH, D, CH)
    if tl.program_id(1) == 0:
        tl.store(COL + b * LP + offs_n, col, mask=mask_n)


# =========================================================================== backward
@triton.jit
def _merge_tile(UB, XB, EB, DAB, DPB, offs_m, mask_m, meta, offs_n, mask_n, lse, col, gamma,
                sul, sud, sxl, sxd, sel, sed, sal, sad, spl, spd, DU, D, inv_tau,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """One (token tile, meta tile) of the backward, recomputed from the inputs: ``(C1, C, dC1)``,
    each (BM, BN) fp32 and zero outside the valid pairs (``lse`` per token, ``col``/``gamma`` per
    meta token, loaded by the caller)."""
    valid = mask_m[:, None] & mask_n[None, :]
    s = _rows_dot(UB, offs_m, mask_m, sul, sud, UB, meta, mask_n, sul, sud, DU, BM, BN, BK, PRECISION) * inv_tau
    c1 = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
    c = tl.where(valid, tl.exp(c1) / col[None, :], 0.0)
    g = _rows_dot(XB, offs_m, mask_m, sxl, sxd, DAB, offs_n, mask_n, sal, sad, D, BM, BN, BK, PRECISION)
    g += _rows_dot(EB, offs_m, mask_m, sel, sed, DPB, offs_n, mask_n, spl, spd, D, BM, BN, BK, PRECISION)
    return c1, c, c * (g - gamma[None, :])


@triton.jit
def _merge_bwd_tokens_kernel(U, IDX, X, E, DA, DP, LSE, COL, GAMMA, DELTA, DU_OUT,
                             sub, sul, sud, sxb, sxl, sxd, seb, sel, sed, sab, sal, sad, spb, spl, spd,
                             L, LP, DU, D, inv_tau,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr,
                             NC: tl.constexpr, PRECISION: tl.constexpr):
    """Per (token tile, channel group), one sweep over the meta tiles: ``DELTA`` and ``dU = dS V``
    (fp32, without the scatter of ``dV``; contiguous), from ``R = C1 (dC1 - r) V`` and ``Q = C1 V``
    (module docstring)."""
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    c0 = tl.program_id(1) * (NC * CH)
    mask_m = offs_m < L
    UB = U + b * sub
    XB = X + b * sxb
    EB = E + b * seb
    DAB = DA + b * sab
    DPB = DP + b * spb
    lse = tl.load(LSE + b * L + offs_m, mask=mask_m, other=0.0)
    delta = tl.zeros([BM], tl.float32)
    ref = tl.zeros([BM], tl.float32)
    u0, q0 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    u1, q1 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    u2, q2 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    u3, q3 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    u4, q4 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    u5, q5 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    u6, q6 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    u7, q7 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    for n0 in range(0, LP, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < LP
        meta = tl.load(IDX + b * LP + offs_n, mask=mask_n, other=0)
        col = tl.load(COL + b * LP + offs_n, mask=mask_n, other=1.0)
        gamma = tl.load(GAMMA + b * LP + offs_n, mask=mask_n, other=0.0)
        c1, c, dc1 = _merge_tile(UB, XB, EB, DAB, DPB, offs_m, mask_m, meta, offs_n, mask_n, lse, col, gamma,
                                 sul, sud, sxl, sxd, sel, sed, sal, sad, spl, spd, DU, D, inv_tau,
                                 BM, BN, BK, PRECISION)
        part = tl.sum(c1 * dc1, 1)
        delta += part
        # r: the first meta tile's C1-weighted mean of dC1, the reference the 16-bit operand is taken from
        ref = tl.where(n0 == 0, part / tl.maximum(tl.sum(c1, 1), 1e-30), ref)
        dsw, dsu = _scaled(c1 * (dc1 - ref[:, None]), U.dtype.element_ty)
        c1w, c1u = _scaled(c1, U.dtype.element_ty)
        u0, q0 = _tok_chunk(u0, q0, dsw, dsu, c1w, c1u, UB, meta, mask_n, sul, sud, c0 + 0 * CH, DU, CH, PRECISION)
        if NC > 1:
            u1, q1 = _tok_chunk(u1, q1, dsw, dsu, c1w, c1u, UB, meta, mask_n, sul, sud, c0 + 1 * CH, DU, CH, PRECISION)
        if NC > 2:
            u2, q2 = _tok_chunk(u2, q2, dsw, dsu, c1w, c1u, UB, meta, mask_n, sul, sud, c0 + 2 * CH, DU, CH, PRECISION)
        if NC > 3:
            u3, q3 = _tok_chunk(u3, q3, dsw, dsu, c1w, c1u, UB, meta, mask_n, sul, sud, c0 + 3 * CH, DU, CH, PRECISION)
        if NC > 4:
            u4, q4 = _tok_chunk(u4, q4, dsw, dsu, c1w, c1u, UB, meta, mask_n, sul, sud, c0 + 4 * CH, DU, CH, PRECISION)
        if NC > 5:
            u5, q5 = _tok_chunk(u5, q5, dsw, dsu, c1w, c1u, UB, meta, mask_n, sul, sud, c0 + 5 * CH, DU, CH, PRECISION)
        if NC > 6:
            u6, q6 = _tok_chunk(u6, q6, dsw, dsu, c1w, c1u, UB, meta, mask_n, sul, sud, c0 + 6 * CH, DU, CH, PRECISION)
        if NC > 7:
            u7, q7 = _tok_chunk(u7, q7, dsw, dsu, c1w, c1u, UB, meta, mask_n, sul, sud, c0 + 7 * CH, DU, CH, PRECISION)
    corr = delta - ref
    rows = b * L + offs_m
    _tok_store(DU_OUT, u0, q0, corr, inv_tau, rows, mask_m, c0 + 0 * CH, DU, CH)
    if NC > 1:
        _tok_store(DU_OUT, u1, q1, corr, inv_tau, rows, mask_m, c0 + 1 * CH, DU, CH)
    if NC > 2:
        _tok_store(DU_OUT, u2, q2, corr, inv_tau, rows, mask_m, c0 + 2 * CH, DU, CH)
    if NC > 3:
        _tok_store(DU_OUT, u3, q3, corr, inv_tau, rows, mask_m, c0 + 3 * CH, DU, CH)
    if NC > 4:
        _tok_store(DU_OUT, u4, q4, corr, inv_tau, rows, mask_m, c0 + 4 * CH, DU, CH)
    if NC > 5:
        _tok_store(DU_OUT, u5, q5, corr, inv_tau, rows, mask_m, c0 + 5 * CH, DU, CH)
    if NC > 6:
        _tok_store(DU_OUT, u6, q6, corr, inv_tau, rows, mask_m, c0 + 6 * CH, DU, CH)
    if NC > 7:
        _tok_store(DU_OUT, u7, q7, corr, inv_tau, rows, mask_m, c0 + 7 * CH, DU, CH)
    if tl.program_id(1) == 0:
        tl.store(DELTA + b * L + offs_m, delta, mask=mask_m)


@triton.jit
def _merge_bwd_dx_kernel(U, IDX, DA, DP, LSE, COL, DX, DE, sub, sul, sud, sab, sal, sad, spb, spl, spd,
                         L, LP, DU, D, inv_tau,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr,
                         NC: tl.constexpr, PRECISION: tl.constexpr):
    """Per (token tile, channel group), one sweep over the meta tiles: ``dX = C dA``, ``dE = C dP``
    (contiguous). Only ``S`` is needed (not ``G``), so this is its own pass: beside the token pass's
    two accumulators per chunk, two more would not fit the registers at D = 768."""
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    c0 = tl.program_id(1) * (NC * CH)
    mask_m = offs_m < L
    UB = U + b * sub
    DAB = DA + b * sab
    DPB = DP + b * spb
    lse = tl.load(LSE + b * L + offs_m, mask=mask_m, other=0.0)
    x0, e0 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    x1, e1 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    x2, e2 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    x3, e3 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    x4, e4 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    x5, e5 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    x6, e6 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    x7, e7 = tl.zeros([BM, CH], tl.float32), tl.zeros([BM, CH], tl.float32)
    for n0 in range(0, LP, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < LP
        col = tl.load(COL + b * LP + offs_n, mask=mask_n, other=1.0)
        valid = mask_m[:, None] & mask_n[None, :]
        meta = tl.load(IDX + b * LP + offs_n, mask=mask_n, other=0)
        s = _rows_dot(UB, offs_m, mask_m, sul, sud, UB, meta, mask_n, sul, sud, DU, BM, BN, BK, PRECISION) * inv_tau
        c1 = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        c = tl.where(valid, tl.exp(c1) / col[None, :], 0.0)
        cw, cu = _scaled(c, DA.dtype.element_ty)
        x0, e0 = _dx_chunk(x0, e0, cw, cu, DAB, DPB, offs_n, mask_n, sal, sad, spl, spd, c0 + 0 * CH, D, CH, PRECISION)
        if NC > 1:
            x1, e1 = _dx_chunk(x1, e1, cw, cu, DAB, DPB, offs_n, mask_n, sal, sad, spl, spd, c0 + 1 * CH, D, CH, PRECISION)
        if NC > 2:
            x2, e2 = _dx_chunk(x2, e2, cw, cu, DAB, DPB, offs_n, mask_n, sal, sad, spl, spd, c0 + 2 * CH, D, CH, PRECISION)
        if NC > 3:
            x3, e3 = _dx_chunk(x3, e3, cw, cu, DAB, DPB, offs_n, mask_n, sal, sad, spl, spd, c0 + 3 * CH, D, CH, PRECISION)
        if NC > 4:
            x4, e4 = _dx_chunk(x4, e4, cw, cu, DAB, DPB, offs_n, mask_n, sal, sad, spl, spd, c0 + 4 * CH, D, CH, PRECISION)
        if NC > 5:
            x5, e5 = _dx_chunk(x5, e5, cw, cu, DAB, DPB, offs_n, mask_n, sal, sad, spl, spd, c0 + 5 * CH, D, CH, PRECISION)
        if NC > 6:
            x6, e6 = _dx_chunk(x6, e6, cw, cu, DAB, DPB, offs_n, mask_n, sal, sad, spl, spd, c0 + 6 * CH, D, CH, PRECISION)
        if NC > 7:
            x7, e7 = _dx_chunk(x7, e7, cw, cu, DAB, DPB, offs_n, mask_n, sal, sad, spl, spd, c0 + 7 * CH, D, CH, PRECISION)
    rows = b * L + offs_m
    _dx_store(DX, DE, x0, e0, rows, mask_m, c0 + 0 * CH, D, CH)
    if NC > 1:
        _dx_store(DX, DE, x1, e1, rows, mask_m, c0 + 1 * CH, D, CH)
    if NC > 2:
        _dx_store(DX, DE, x2, e2, rows, mask_m, c0 + 2 * CH, D, CH)
    if NC > 3:
        _dx_store(DX, DE, x3, e3, rows, mask_m, c0 + 3 * CH, D, CH)
    if NC > 4:
        _dx_store(DX, DE, x4, e4, rows, mask_m, c0 + 4 * CH, D, CH)
    if NC > 5:
        _dx_store(DX, DE, x5, e5, rows, mask_m, c0 + 5 * CH, D, CH)
    if NC > 6:
        _dx_store(DX, DE, x6, e6, rows, mask_m, c0 + 6 * CH, D, CH)
    if NC > 7:
        _dx_store(DX, DE, x7, e7, rows, mask_m, c0 + 7 * CH, D, CH)


@triton.jit
def _merge_bwd_meta_kernel(U, IDX, X, E, DA, DP, LSE, COL, GAMMA, DELTA, DU_OUT,
                           sub, sul, sud, sxb, sxl, sxd, seb, sel, sed, sab, sal, sad, spb, spl, spd,
                           L, LP, DU, D, inv_tau,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr,
                           NC: tl.constexpr, PRECISION: tl.constexpr):
    """Per (meta tile, channel group): ``dV = dS^T U`` streamed over token tiles, added to the rows
    ``idx`` of ``DU_OUT`` (fp32, contiguous)."""
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    c0 = tl.program_id(1) * (NC * CH)
    mask_n = offs_n < LP
    UB = U + b * sub
    XB = X + b * sxb
    EB = E + b * seb
    DAB = DA + b * sab
    DPB = DP + b * spb
    meta = tl.load(IDX + b * LP + offs_n, mask=mask_n, other=0)
    col = tl.load(COL + b * LP + offs_n, mask=mask_n, other=1.0)
    gamma = tl.load(GAMMA + b * LP + offs_n, mask=mask_n, other=0.0)
    v0 = tl.zeros([BN, CH], tl.float32)
    v1 = tl.zeros([BN, CH], tl.float32)
    v2 = tl.zeros([BN, CH], tl.float32)
    v3 = tl.zeros([BN, CH], tl.float32)
    v4 = tl.zeros([BN, CH], tl.float32)
    v5 = tl.zeros([BN, CH], tl.float32)
    v6 = tl.zeros([BN, CH], tl.float32)
    v7 = tl.zeros([BN, CH], tl.float32)
    for m0 in range(0, L, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < L
        delta = tl.load(DELTA + b * L + offs_m, mask=mask_m, other=0.0)
        lse = tl.load(LSE + b * L + offs_m, mask=mask_m, other=0.0)
        c1, c, dc1 = _merge_tile(UB, XB, EB, DAB, DPB, offs_m, mask_m, meta, offs_n, mask_n, lse, col, gamma,
                                 sul, sud, sxl, sxd, sel, sed, sal, sad, spl, spd, DU, D, inv_tau,
                                 BM, BN, BK, PRECISION)
        ds = c1 * (dc1 - delta[:, None]) * inv_tau                      # (BM, BN)
        dsw, dsu = _scaled(tl.trans(ds), U.dtype.element_ty)
        v0 = _meta_chunk(v0, dsw, dsu, UB, offs_m, mask_m, sul, sud, c0 + 0 * CH, DU, CH, PRECISION)
        if NC > 1:
            v1 = _meta_chunk(v1, dsw, dsu, UB, offs_m, mask_m, sul, sud, c0 + 1 * CH, DU, CH, PRECISION)
        if NC > 2:
            v2 = _meta_chunk(v2, dsw, dsu, UB, offs_m, mask_m, sul, sud, c0 + 2 * CH, DU, CH, PRECISION)
        if NC > 3:
            v3 = _meta_chunk(v3, dsw, dsu, UB, offs_m, mask_m, sul, sud, c0 + 3 * CH, DU, CH, PRECISION)
        if NC > 4:
            v4 = _meta_chunk(v4, dsw, dsu, UB, offs_m, mask_m, sul, sud, c0 + 4 * CH, DU, CH, PRECISION)
        if NC > 5:
            v5 = _meta_chunk(v5, dsw, dsu, UB, offs_m, mask_m, sul, sud, c0 + 5 * CH, DU, CH, PRECISION)
        if NC > 6:
            v6 = _meta_chunk(v6, dsw, dsu, UB, offs_m, mask_m, sul, sud, c0 + 6 * CH, DU, CH, PRECISION)
        if NC > 7:
            v7 = _meta_chunk(v7, dsw, dsu, UB, offs_m, mask_m, sul, sud, c0 + 7 * CH, DU, CH, PRECISION)
    rows = b * L + meta
    _meta_add(DU_OUT, v0, rows, mask_n, c0 + 0 * CH, DU, CH)
    if NC > 1:
        _meta_add(DU_OUT, v1, rows, mask_n, c0 + 1 * CH, DU, CH)
    if NC > 2:
        _meta_add(DU_OUT, v2, rows, mask_n, c0 + 2 * CH, DU, CH)
    if NC > 3:
        _meta_add(DU_OUT, v3, rows, mask_n, c0 + 3 * CH, DU, CH)
    if NC > 4:
        _meta_add(DU_OUT, v4, rows, mask_n, c0 + 4 * CH, DU, CH)
    if NC > 5:
        _meta_add(DU_OUT, v5, rows, mask_n, c0 + 5 * CH, DU, CH)
    if NC > 6:
        _meta_add(DU_OUT, v6, rows, mask_n, c0 + 6 * CH, DU, CH)
    if NC > 7:
        _meta_add(DU_OUT, v7, rows, mask_n, c0 + 7 * CH, DU, CH)


# =========================================================================== materialised (L' <= 2 D)
@triton.jit
def _row_softmax(s, mask, mask_r):
    """``(C1, m, total)`` of ``R`` rows of base-2 scores (``-inf`` outside ``mask``): ``C1`` the rows'
    softmax (0 outside), normalised by the row sum itself — every pass that recomputes it from the
    same ``S`` gets the same values bit for bit — and ``m + log2(total)`` the rows' base-2
    log-sum-exp."""
    m = tl.where(mask_r, tl.max(s, 1), 0.0)
    e = tl.exp2(s - m[:, None])
    total = tl.where(mask_r, tl.sum(e, 1), 1.0)
    return tl.where(mask, e * (1.0 / total)[:, None], 0.0), m, total


@triton.jit
def _merge_rows_fwd_kernel(S, C, LSE, COLP, COL, L, LP, inv_tau, c_scale,
                           ROWS: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, WRITE: tl.constexpr):
    """Per ``ROWS`` token rows of one problem, ``R`` at a time, from the scores ``S = U V^T`` (fp32,
    before ``1 / tau``), ``C1 = softmax_meta(S / tau)`` and ``W = exp(C1)`` (``C1`` is in [0, 1]: no
    running maximum). Two passes: the first (``WRITE`` false) writes ``LSE[n] = logsumexp_j S[n, j] /
    tau`` and the program's column sums of ``W`` into ``COLP[b, program]``; the second, given the
    column sums ``COL``, writes ``C = W / col`` times ``c_scale`` (an exact power of two that keeps
    float16's ``C ~ 1 / L`` normal; 1 otherwise) in the inputs' dtype: the operand of ``A = C^T X``
    and ``P = C^T E``. All contiguous, rows of ``L'``."""
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask_c = cols < LP
    if WRITE:
        factor = c_scale / tl.load(COL + b * LP + cols, mask=mask_c, other=1.0)
    else:
        col = tl.zeros([BLOCK], tl.float32)
    scale = inv_tau * 1.4426950408889634            # base-2 exponents
    for r0 in range(0, ROWS, R):
        rows = t * ROWS + r0 + tl.arange(0, R)
        mask_r = rows < L
        mask = mask_r[:, None] & mask_c[None, :]
        offs = (b * L + rows)[:, None] * LP + cols[None, :]
        c1, m, total = _row_softmax(tl.load(S + offs, mask=mask, other=float("-inf")) * scale, mask, mask_r)
        w = tl.where(mask, tl.exp(c1), 0.0)
        if WRITE:
            tl.store(C + offs, (w * factor[None, :]).to(C.dtype.element_ty), mask=mask)
        else:
            col += tl.sum(w, 0)
            tl.store(LSE + b * L + rows, (m + tl.log2(total)) * 0.6931471805599453, mask=mask_r)
    if not WRITE:
        tl.store(COLP + (b * tl.num_programs(0) + t) * LP + cols, col, mask=mask_c)


@triton.jit
def _merge_rows_bwd_kernel(S, GX, GE, COL, GAMMA, DS, C, L, LP, inv_tau, scale_,
                           ROWS: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """Per ``ROWS`` token rows of one problem, ``R`` at a time, from ``S = U V^T`` and ``G = GX + GE``
    (``X dA^T``, ``E dP^T``; fp32): ``C1 = softmax_meta(S / tau)`` (the forward's), ``W = exp(C1)``,
    ``C = W / col``, ``dC1 = C (G - gamma)``, ``delta_n = sum_j C1 dC1``, and writes ``dS = C1 (dC1 -
    delta) / tau`` and ``C`` (the operand of ``dX = C dA``, ``dE = C dP``), both times ``scale_``
    (float16: an exact power of two that keeps them normal; 1 otherwise) in the inputs' dtype. All
    contiguous, rows of ``L'``."""
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask_c = cols < LP
    inv_col = 1.0 / tl.load(COL + b * LP + cols, mask=mask_c, other=1.0)
    gamma = tl.load(GAMMA + b * LP + cols, mask=mask_c, other=0.0)
    scale = inv_tau * 1.4426950408889634
    for r0 in range(0, ROWS, R):
        rows = t * ROWS + r0 + tl.arange(0, R)
        mask_r = rows < L
        mask = mask_r[:, None] & mask_c[None, :]
        offs = (b * L + rows)[:, None] * LP + cols[None, :]
        c1, _, _ = _row_softmax(tl.load(S + offs, mask=mask, other=float("-inf")) * scale, mask, mask_r)
        c = tl.where(mask, tl.exp(c1), 0.0) * inv_col[None, :]
        g = tl.load(GX + offs, mask=mask, other=0.0) + tl.load(GE + offs, mask=mask, other=0.0)
        dc1 = c * (g - gamma[None, :])
        delta = tl.sum(c1 * dc1, 1)
        tl.store(DS + offs, (c1 * (dc1 - delta[:, None]) * (inv_tau * scale_)).to(DS.dtype.element_ty), mask=mask)
        tl.store(C + offs, (c * scale_).to(C.dtype.element_ty), mask=mask)


# =========================================================================== launch configuration
# Tiles: 16 x 16 score tiles (the smallest tl.dot: least ragged padding, 16-row accumulators),
# BK-wide contraction steps for S and G, CH-channel output chunks. float32's tf32x3 products need
# about twice the registers: narrower chunks, fewer resident.
MERGE_BLOCKS = {"half": dict(BM=16, BN=16, BK=64, CH=128), "fp32": dict(BM=16, BN=16, BK=32, CH=64)}
# The chunk counts (NC) a program can keep resident, each a compiled configuration: exact for
# D = 128, 384, 768 (half); other widths round up to the next (idle chunks issue products, no
# loads), wider ones split over programs.
MERGE_CHUNKS = {"half": (1, 3, 6), "fp32": (1, 2)}
SLOTS = 8                   # accumulator slots written out in the kernels: NC <= SLOTS
# accumulators (BM or BN rows x CH) of each chunked kernel per chunk
_ACCUMULATORS = {"fwd": 2, "tokens": 2, "dx": 2, "meta": 1}


def merge_blocks(dtype) -> tuple:
    """(BM, BN, BK, CH) of the merge kernels for inputs of ``dtype``."""
    cfg = MERGE_BLOCKS["fp32" if dtype == torch.float32 else "half"]
    return cfg["BM"], cfg["BN"], cfg["BK"], cfg["CH"]


def merge_chunks(dtype) -> tuple:
    """The resident chunk counts (``NC``) for inputs of ``dtype``, ascending."""
    return MERGE_CHUNKS["fp32" if dtype == torch.float32 else "half"]


def channel_split(width: int, ch: int, counts: tuple) -> tuple:
    """``(groups, NC)``: ``width`` channels in ``CH``-chunks, split over the fewest channel groups
    (programs per tile) of at most ``max(counts)`` chunks, ``NC`` the smallest of ``counts`` that
    holds a group's share."""
    chunks = triton.cdiv(max(width, 1), ch)
    groups = triton.cdiv(chunks, counts[-1])
    share = triton.cdiv(chunks, groups)
    return groups, next(n for n in counts if n >= share)


#: fp32 accumulator registers a thread may hold per kernel (the rest of the file holds ``S``, ``G``
#: and the pipelined operand tiles): the dX/dE pass spilled 8
#: bytes at 64 (NC = 3, 16-bit, sm_80; NC = 2, float32) once compiled as the JIT specialises a launch
ACCUMULATOR_REGS = {"fwd": 64, "tokens": 64, "dx": 32, "meta": 64}
#: pipeline stages of the backward's dX/dE and meta passes: Triton's default 3 buffered the gathered
#: tiles three deep, 98.6 KB of shared memory (dX/dE, NC = 6) and registers past 128 (8-byte spills
#: in dX/dE NC = 3 and 6 and meta NC = 3 on sm_90); 2 keeps both clean on Triton 3.8. The token
#: pass spilled 8-24 bytes at NC = 1 (16-bit) wherever ``L'`` has no divisibility hint (an odd count
#: of meta tokens) at 3 or 2 stages and 4 or 8 warps (ptxas holds it to 128 registers); unpipelined
#: it is clean at every NC. Triton 3.6 spilled 8-16 bytes in dX/dE at 2 stages and in the forward
#: pass at NC = 1 and 3 with odd ``L'`` at 3 or 2: 1 stage for both there.
MERGE_STAGES = for_triton({"dx": 2, "meta": 2, "tokens": 1}, {(3, 8): {"dx": 1, "fwd": 1}})
#: warps that differ on older Tritons, by (kernel, dtype class, NC): Triton 3.6's unpipelined dX/dE
#: pass spilled 8 bytes with odd ``L'`` at NC = 1 on 8 warps (sm_90) and at NC = 6 on 16 (sm_80,
#: ptxas held it to 128 registers); 4 and 8 are clean
WARPS_EXCEPT = for_triton({}, {(3, 8): {("dx", "half", 1): 4, ("dx", "half", 6): 8}})


def merge_warps(kernel: str, nc: int, rows: int, ch: int, dtype) -> int:
    """Warps of a merge kernel: 8 at least for the backward's token, dX/dE and meta passes (their
    ``S`` and ``G`` tiles and row scalings, not the accumulators, are what fills the registers) and
    for float32's forward pass (tf32x3 operand splits), then enough that the fp32 accumulators take
    at most :data:`ACCUMULATOR_REGS` registers a thread, up to 16 warps — but at most 8 for the
    token pass, which needs more than the 128 registers a thread 16 warps leave. Found with
    ``python -m vidkern.aot``, which compiles each launch as Triton's JIT specialises it and checks
    that none spills on sm_80/sm_90, on Triton 3.6 and 3.8 (:data:`WARPS_EXCEPT`)."""
    if kernel == "lse":
        return 4
    if (kernel, dtype_class(dtype), nc) in WARPS_EXCEPT:
        return WARPS_EXCEPT[(kernel, dtype_class(dtype), nc)]
    floats = _ACCUMULATORS[kernel] * nc * rows * ch
    warps = 8 if kernel in ("tokens", "meta", "dx") or (kernel == "fwd" and dtype == torch.float32) else 4
    most = 8 if kernel == "tokens" else 16
    while warps < most and floats > ACCUMULATOR_REGS[kernel] * 32 * warps:
        warps *= 2
    return warps


def merge_config(kernel: str, dtype, nc: int = 1) -> Config:
    """The launch of merge kernel ``kernel`` (``"lse"``, ``"fwd"``, ``"tokens"``, ``"dx"``,
    ``"meta"``) with ``nc`` resident channel chunks: the tiles of :func:`merge_blocks` (the lse pass
    has no output channels: no ``CH``, ``NC``), :func:`merge_warps` and :data:`MERGE_STAGES`."""
    bm, bn, bk, ch = merge_blocks(dtype)
    rows = bm if kernel in ("lse", "tokens", "dx") else bn
    tiles = dict(BM=bm, BN=bn, BK=bk) if kernel == "lse" else dict(BM=bm, BN=bn, BK=bk, CH=ch, NC=nc)
    return Config.of(num_warps=merge_warps(kernel, nc, rows, ch, dtype), num_stages=MERGE_STAGES.get(kernel), **tiles)


#: the materialised path's row kernels: ``ROWS`` token rows a program, ``R`` at a time, a whole row
#: of ``L'`` scores in ``BLOCK`` lanes (a power of two from ``MERGE_ROW_BLOCKS``); ``R BLOCK`` about
#: ``MERGE_ROW_ELEMS`` elements a step, 16 fp32 a thread (4 warps; 8 at 4096-wide rows)
MERGE_ROW_BLOCKS = tuple(1 << k for k in range(7, MERGE_MATERIALISE_MAX_META.bit_length()))
MERGE_ROW_ELEMS = 2048
MERGE_ROWS = 32


def merge_row_config(lp: int) -> Config:
    """The launch of the materialised path's row kernels for ``L' = lp`` scores a row."""
    block = next(blk for blk in MERGE_ROW_BLOCKS if blk >= lp)
    r = max(1, MERGE_ROW_ELEMS // block)
    return Config.of(num_warps=max(4, r * block // 512), ROWS=MERGE_ROWS, R=r, BLOCK=block)


# =========================================================================== launchers
def _gemm32(a, b):
    """``a @ b`` batched, accumulated and returned in float32: cuBLAS's float32 output from 16-bit
    operands (``torch.bmm``'s ``out_dtype``, CUDA only); off a GPU (the interpreter's tests) the
    same product computed in float32."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _meta_rows(u, idx):
    """``V = U[idx]`` ``(B, L', Du)``."""
    return u.gather(1, idx[..., None].expand(-1, -1, u.shape[2]))


def half_scale(length: int, dtype) -> float:
    """The exact power of two the materialised path scales its 16-bit operands ``C`` (forward and
    backward) and ``dS`` by before their cast, and its float32 products back by: for float16,
    ``2^floor(log2 L)`` — ``C = W / col ~ 1 / L`` and ``dS ~ |dA| sqrt(D) / (L L')`` would be
    subnormal there (float16's smallest normal is 6e-5) at ordinary sizes; scaled by ``~L`` they
    are ``O(1)`` and the size of the incoming gradients, which are float16 themselves (``|dS| L <=
    2 e |G|`` cannot overflow where ``G`` does not). 1 for bfloat16 and float32, which have
    float32's range: their products are written in their dtype straight from cuBLAS."""
    return float(1 << (max(length, 1).bit_length() - 1)) if dtype == torch.float16 else 1.0


def _product(a, b, scale: float, dtype):
    """``(a @ b) / scale`` in ``dtype``: cuBLAS's own output when ``scale`` is 1, else its float32
    product scaled back and cast."""
    if scale == 1.0:
        return torch.bmm(a, b)
    return (_gemm32(a, b) * (1.0 / scale)).to(dtype)


def _materialised_forward(u, idx, x, e, tau):
    """The forward while ``merge_materialises`` (``L' <= 2 D``): ``S = U V^T`` (fp32, one GEMM), the
    row kernel's two passes (``LSE`` and column sums; then ``C = W / col``), ``A = C^T X`` and ``P =
    C^T E`` (two GEMMs). 3U of products, all on cuBLAS; scratch ``(B, L, L')`` fp32 and 16-bit."""
    b, length, _ = u.shape
    lp, dtype = idx.shape[1], x.dtype
    cfg = merge_row_config(lp)
    tiles = triton.cdiv(length, cfg.ROWS)
    scale = half_scale(length, dtype)
    s = _gemm32(u, _meta_rows(u, idx).transpose(1, 2))
    c = torch.empty((b, length, lp), dtype=dtype, device=x.device)
    lse = torch.empty((b, length), dtype=torch.float32, device=x.device)
    colp = torch.empty((b, tiles, lp), dtype=torch.float32, device=x.device)
    for bs in batch_chunks(b):
        _merge_rows_fwd_kernel[(tiles, bs.stop - bs.start)](s[bs], c[bs], lse[bs], colp[bs], colp[bs], length, lp,
                                                            1.0 / tau, scale, WRITE=False, **cfg.launch())
    col = colp.sum(1)
    for bs in batch_chunks(b):
        _merge_rows_fwd_kernel[(tiles, bs.stop - bs.start)](s[bs], c[bs], lse[bs], colp[bs], col[bs], length, lp,
                                                            1.0 / tau, scale, WRITE=True, **cfg.launch())
    ct = c.transpose(1, 2)
    return _product(ct, x, scale, dtype), _product(ct, e.expand(b, -1, -1), scale, dtype), lse, col


def _materialised_backward(grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum, tau):
    """The backward while ``merge_materialises``: ``S = U V^T``, ``X dA^T``, ``E dP^T`` (fp32 GEMMs),
    the row kernel (``dS``, ``C``), then ``dU = dS V + scatter_idx(dS^T U)``, ``dX = C dA``, ``dE =
    C dP`` (GEMMs). 7U of products, each once."""
    b, length, du_dim = u.shape
    lp, dtype = idx.shape[1], x.dtype
    cfg = merge_row_config(lp)
    tiles = triton.cdiv(length, cfg.ROWS)
    gamma = gamma_of(grad_a, grad_p, a, p)
    v = _meta_rows(u, idx)
    s = _gemm32(u, v.transpose(1, 2))
    gx, ge = _gemm32(x, grad_a.transpose(1, 2)), _gemm32(e.expand(b, -1, -1), grad_p.transpose(1, 2))
    scale = half_scale(length, dtype)
    ds = torch.empty((b, length, lp), dtype=dtype, device=x.device)
    c = torch.empty_like(ds)
    for bs in batch_chunks(b):
        _merge_rows_bwd_kernel[(tiles, bs.stop - bs.start)](s[bs], gx[bs], ge[bs], col_sum[bs], gamma[bs], ds[bs],
                                                            c[bs], length, lp, 1.0 / tau, scale, **cfg.launch())
    del s, gx, ge
    rows = idx[..., None].expand(-1, -1, du_dim)
    if scale == 1.0:        # dS V and dS^T U in the inputs' dtype; the L' meta rows add the two
        du = torch.bmm(ds, v).scatter_add_(1, rows, torch.bmm(ds.transpose(1, 2), u))
    else:
        du = _gemm32(ds, v).scatter_add_(1, rows, _gemm32(ds.transpose(1, 2), u))
        du = (du * (1.0 / scale)).to(dtype)
    return du, _product(c, grad_a, scale, dtype), _product(c, grad_p, scale, dtype)


@on_input_device
def soft_merge_forward(u, idx, x, e, tau):
    """``u (B, L, Du)``, ``idx (B, L')``, ``x, e (B, L, D)`` any strides (``e`` may be a stride-0
    broadcast) -> ``(A, P, row_lse (B, L) fp32, col_sum (B, L') fp32)``. Materialised (GEMMs and a
    row kernel) while ``merge_materialises(L', D)``, streamed otherwise."""
    b, length, du = u.shape
    lp, d = idx.shape[1], x.shape[2]
    if b and merge_materialises(lp, d):
        return _materialised_forward(u, idx, x, e, tau)
    bm, bn, _, ch = merge_blocks(x.dtype)
    groups, nc = channel_split(d, ch, merge_chunks(x.dtype))
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
                                                         1.0 / tau, PRECISION=prec,
                                                         **merge_config("lse", x.dtype).launch())
        _merge_fwd_kernel[(triton.cdiv(lp, bn), groups, nb)](
            u[bs], idx[bs], x[bs], e[bs], lse[bs], a[bs], p[bs], col[bs], *u.stride(), *x.stride(), *e.stride(),
            length, lp, du, d, 1.0 / tau, PRECISION=prec, **merge_config("fwd", x.dtype, nc).launch())
    return a, p, lse, col


def gamma_of(grad_a, grad_p, a, p):
    """``gamma_j = A_j.dA_j + P_j.dP_j`` ``(B, L')`` fp32 (``= sum_n C[n, j] G[n, j]``, since
    ``A = C^T X`` and ``P = C^T E``): tiny, left to torch."""
    return ((grad_a.float() * a.float()).sum(-1) + (grad_p.float() * p.float()).sum(-1)).contiguous()


@on_input_device
def soft_merge_backward(grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum, tau):
    """Returns ``(du, dx, de)`` in the inputs' dtypes (contiguous)."""
    b, length, du_dim = u.shape
    lp, d = idx.shape[1], x.shape[2]
    if b and merge_materialises(lp, d):
        return _materialised_backward(grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum, tau)
    bm, bn, _, ch = merge_blocks(x.dtype)
    max_chunks = merge_chunks(x.dtype)
    groups_u, nc_u = channel_split(du_dim, ch, max_chunks)      # dU (token pass), dV (meta pass)
    groups_x, nc_x = channel_split(d, ch, max_chunks)           # dX, dE
    dx = torch.empty((b, length, d), dtype=x.dtype, device=x.device)
    de = torch.empty((b, length, d), dtype=e.dtype, device=x.device)
    du = torch.empty((b, length, du_dim), dtype=torch.float32, device=x.device)
    if b == 0:
        return du.to(u.dtype), dx, de
    idx = idx.contiguous()
    gamma = gamma_of(grad_a, grad_p, a, p)
    delta = torch.empty((b, length), dtype=torch.float32, device=x.device)
    prec = dot_precision(x.dtype)
    common = (*u.stride(), *x.stride(), *e.stride(), *grad_a.stride(), *grad_p.stride(), length, lp, du_dim, d,
              1.0 / tau)
    for bs in batch_chunks(b):
        nb = bs.stop - bs.start
        ins = tuple(t[bs] for t in (u, idx, x, e, grad_a, grad_p, row_lse, col_sum, gamma))
        _merge_bwd_tokens_kernel[(triton.cdiv(length, bm), groups_u, nb)](
            *ins, delta[bs], du[bs], *common, PRECISION=prec,
            **merge_config("tokens", x.dtype, nc_u).launch())
        _merge_bwd_dx_kernel[(triton.cdiv(length, bm), groups_x, nb)](
            u[bs], idx[bs], grad_a[bs], grad_p[bs], row_lse[bs], col_sum[bs], dx[bs], de[bs],
            *u.stride(), *grad_a.stride(), *grad_p.stride(), length, lp, du_dim, d, 1.0 / tau,
            PRECISION=prec, **merge_config("dx", x.dtype, nc_x).launch())
        _merge_bwd_meta_kernel[(triton.cdiv(lp, bn), groups_u, nb)](
            *ins, delta[bs], du[bs], *common, PRECISION=prec,
            **merge_config("meta", x.dtype, nc_u).launch())
    return du.to(u.dtype), dx, de


# =========================================================================== AOT configurations (vidkern.aot)
MERGE_KERNELS = {"merge_lse": _merge_lse_kernel, "merge_fwd": _merge_fwd_kernel,
                 "merge_bwd_tokens": _merge_bwd_tokens_kernel, "merge_bwd_dx": _merge_bwd_dx_kernel,
                 "merge_bwd_meta": _merge_bwd_meta_kernel}


def aot_specs(dtype) -> list:
    """The configurations the soft-merge launchers can launch for inputs of ``dtype``
    (``vidkern.aot``): the streamed path's lse kernel and each chunked kernel at every ``NC`` of
    ``merge_chunks(dtype)``, and the materialised path's row kernels at every ``BLOCK`` of
    :data:`MERGE_ROW_BLOCKS` (the forward's two passes)."""
    import inspect
    specs = []
    for name, fn in MERGE_KERNELS.items():
        params = inspect.signature(fn.fn).parameters
        kernel = name.rsplit("_", 1)[-1]
        for nc in (merge_chunks(dtype) if "NC" in params else [1]):
            specs.append(merge_config(kernel, dtype, nc).aot("sttm", name, fn, dtype, PRECISION=dot_precision(dtype)))
    for block in MERGE_ROW_BLOCKS:
        cfg = merge_row_config(block)
        specs += [cfg.aot("sttm", "merge_rows_fwd", _merge_rows_fwd_kernel, dtype, WRITE=write) for write in (False, True)]
        specs.append(cfg.aot("sttm", "merge_rows_bwd", _merge_rows_bwd_kernel, dtype))
    return specs


def _aot_launch(dtype, length: int, lp: int, d: int):
    def launch():
        b = 2 if length < 4096 else 1
        u, x = (torch.empty((b, length, d), dtype=dtype) for _ in range(2))
        e = torch.empty((1, length, d), dtype=dtype).expand(b, length, d)   # position features: a broadcast
        idx = torch.arange(lp).expand(b, lp).contiguous()
        a, p, lse, col = soft_merge_forward(u, idx, x, e, 0.1)
        soft_merge_backward(torch.empty_like(a), torch.empty_like(p), u, idx, x, e, a, p, lse, col, 0.1)
    return launch


def aot_launches(dtype) -> list:
    """``(label, launch)`` pairs: each ``launch()`` runs the soft-merge launchers (forward and
    backward) on CPU tensors of ``dtype`` (``vidkern.aot`` records the kernel launches): the
    reference shapes (sttm_vit_b's two stages, materialised, and the long clip, streamed, at D =
    768, the position features a batch broadcast); then per chunk count ``NC`` a streamed merge
    (``L' > 2 D``) with ragged sizes and one with sizes divisible by 16; then a materialised merge
    per row ``BLOCK``."""
    ch = merge_blocks(dtype)[3]
    launches = [(f"{length} -> {lp}, D=768", _aot_launch(dtype, length, lp, 768))
                for length, lp in ((196, 98), (784, 392), (12544, 6272))]
    for nc in merge_chunks(dtype):
        w = nc * ch
        launches += [(f"NC={nc}: {4 * w + 2} -> {2 * w + 1}, D={w}", _aot_launch(dtype, 4 * w + 2, 2 * w + 1, w)),
                     (f"NC={nc}: {4 * w} -> {2 * w + 16}, D={w}", _aot_launch(dtype, 4 * w, 2 * w + 16, w))]
    for block in MERGE_ROW_BLOCKS:
        lp = 3 * block // 4
        launches.append((f"BLOCK={block}: {lp + 2} -> {lp}, D={lp // 2}", _aot_launch(dtype, lp + 2, lp, lp // 2)))
    return launches
