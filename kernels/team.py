"""Triton kernels for TEAM's fused ops (SPEC §2): ``feature_summary`` and ``team_gate``,
forward and backward, fp32 accumulation for every input dtype.

Every launch that touches ``B*N*D`` data splits the token axis, so a small batch still fills the
GPU (:data:`TARGET_PROGRAMS`), and partial results are merged in a fixed order — no atomics, so
results are bitwise reproducible run to run. No scratch is ``B*N*D``-sized; the work model of
these launchers is :mod:`vidkern.work.team`.

``feature_summary`` ``f[b,c] = sum_n softmax_n(X[b,:,c]) X[b,n,c]``: forward — programs (channel
block, token split, batch) stream their tokens with an online (max, sum-exp, weighted mean) per
channel; a small merge kernel combines the splits' states in split order into ``f`` and the saved
``stats = (max, sum-exp, f)``. Backward ``dX = P (1 + X - f) df`` with ``P = exp(X - max) / sum``:
one pass over the same split grid (no log-sum-exp round trip, whose float32 rounding costs about
``|lse|`` ulps).

``team_gate`` ``Y = s[n] g[c] X`` (``g = sigmoid(h)``, ``s = softmax_n(s0)``, ``s0[n] =
sum_c softmax_c(X')[c] X'[c]``, ``X' = g X``): per-token work needs a whole row of channels, the
token softmax all of a batch row's ``s0``, so each direction is two passes of row programs
(``rows`` tokens each, the gate computed once per program) with the per-batch step folded into
the second pass: forward — rows: ``s0``, its channel log-sum-exp, and the program's (max,
sum-exp) of ``s0``; apply: merge the batch row's per-program states in order -> ``s``, write ``s``
and ``Y``. Backward — rows: ``ds = dY . X'`` and the program's ``sum_n s ds``; rows: merge those
in order, ``ds0 = s (ds - sum s ds)``, ``dX = g (s dY + ds0 Q (1 + X' - s0))`` (``Q``, ``s0``
recomputed from the row) and the program's column sums of ``dX' X``; dh: sum those per-program
partials in program order, ``dh = sum * g (1 - g)``.
"""
from __future__ import annotations

import triton
import triton.language as tl
import torch

from .launch import Config, batch_chunks, on_input_device

#: Elements of a per-program partial-state vector read at once by the merging programs.
_PART_BLOCK = tl.constexpr(128)


# =========================================================================== feature_summary
@triton.jit
def _rows_f32(base, offs_n, offs_d, sn, sd, mask):
    """Tokens ``offs_n`` x channels ``offs_d`` of one batch row, in fp32 (masked entries 0)."""
    return tl.load(base + offs_n[:, None] * sn + offs_d[None, :] * sd, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _channel_row(xb, n, sxn, mask_d):
    """Token ``n``'s channels ``xb`` (a pointer vector) in fp32; channels past D read 0."""
    return tl.load(xb + n * sxn, mask=mask_d, other=0.0).to(tl.float32)


@triton.jit
def _summary_fwd_kernel(X, PART, sxb, sxn, sxd, N, D, rows, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (channel block, split, batch) over tokens ``[split * rows, (split + 1) * rows)``:
    PART[b, split, :, c] = (max, sum-exp, softmax-weighted mean) of X[b, tokens, c] (fp32).

    A thread owns its channels and walks the tokens: the online (max, sum-exp, weighted sum) is
    elementwise, with no reduction across threads (a 2D tile reduced over its token axis cost 144
    shuffles and 24 barriers a tile on sm_90). Four tokens a step share one rescale: 1.25 exp a
    element. Masked channels read 0 and are never stored."""
    tl.static_assert(BLOCK_N == 4)
    b = tl.program_id(2).to(tl.int64)
    split = tl.program_id(1)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    xb = X + b * sxb + offs_d * sxd
    m = tl.full([BLOCK_D], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_D], tl.float32)
    w = tl.zeros([BLOCK_D], tl.float32)
    n0 = split * rows
    n1 = tl.minimum(n0 + rows, N)
    whole = n0 + (n1 - n0) // BLOCK_N * BLOCK_N
    for n in range(n0, whole, BLOCK_N):
        x0 = _channel_row(xb, n, sxn, mask_d)
        x1 = _channel_row(xb, n + 1, sxn, mask_d)
        x2 = _channel_row(xb, n + 2, sxn, mask_d)
        x3 = _channel_row(xb, n + 3, sxn, mask_d)
        m_new = tl.maximum(tl.maximum(m, tl.maximum(x0, x1)), tl.maximum(x2, x3))
        alpha = tl.exp(m - m_new)                      # 0 at the first step (m = -inf)
        e0, e1, e2, e3 = tl.exp(x0 - m_new), tl.exp(x1 - m_new), tl.exp(x2 - m_new), tl.exp(x3 - m_new)
        s = s * alpha + ((e0 + e1) + (e2 + e3))
        w = w * alpha + ((e0 * x0 + e1 * x1) + (e2 * x2 + e3 * x3))
        m = m_new
    for n in range(whole, n1):                         # the last rows % 4 tokens
        x = _channel_row(xb, n, sxn, mask_d)
        m_new = tl.maximum(m, x)
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        s = s * alpha + e
        w = w * alpha + e * x
        m = m_new
    f = w / s
    part = PART + (b * tl.num_programs(1) + split) * 3 * D + offs_d
    tl.store(part, m, mask=mask_d)
    tl.store(part + D, s, mask=mask_d)
    tl.store(part + 2 * D, f, mask=mask_d)


@triton.jit
def _summary_merge_kernel(PART, F, STATS, D, splits, BLOCK_D: tl.constexpr):
    """Program (channel block, batch): merge PART[b, 0..splits-1] in split order into
    ``STATS[b] = (max, sum-exp, f)`` (fp32) and ``F[b] = f`` (X's dtype)."""
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m = tl.full([BLOCK_D], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_D], tl.float32)
    w = tl.zeros([BLOCK_D], tl.float32)
    # two passes, so the splits' terms are independent (no rescale chained through every split):
    # the maximum, then the sums rescaled to it, in split order
    for i in range(0, splits):
        m = tl.maximum(m, tl.load(PART + (b * splits + i) * 3 * D + offs_d, mask=mask_d, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    for i in range(0, splits):
        part = PART + (b * splits + i) * 3 * D + offs_d
        mi = tl.load(part, mask=mask_d, other=float("-inf"))
        ai = tl.load(part + D, mask=mask_d, other=0.0) * tl.exp(mi - m_safe)
        s += ai
        w += ai * tl.load(part + 2 * D, mask=mask_d, other=0.0)
    f = w / s
    tl.store(F + b * D + offs_d, f.to(F.dtype.element_ty), mask=mask_d)
    tl.store(STATS + b * 3 * D + offs_d, m, mask=mask_d)
    tl.store(STATS + b * 3 * D + D + offs_d, s, mask=mask_d)
    tl.store(STATS + b * 3 * D + 2 * D + offs_d, f, mask=mask_d)


@triton.jit
def _summary_bwd_kernel(X, STATS, DF, DX, sxb, sxn, sxd, sdfb, sdfd, N, D, rows,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (channel block, split, batch): dX = P (1 + X - f) df over its tokens,
    P = exp(X - max) / sum (DX contiguous; df any strides)."""
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m = tl.load(STATS + b * 3 * D + offs_d, mask=mask_d, other=0.0)
    s = tl.load(STATS + b * 3 * D + D + offs_d, mask=mask_d, other=1.0)
    f = tl.load(STATS + b * 3 * D + 2 * D + offs_d, mask=mask_d, other=0.0)
    df = tl.load(DF + b * sdfb + offs_d * sdfd, mask=mask_d, other=0.0).to(tl.float32)
    n0 = tl.program_id(1) * rows
    n1 = tl.minimum(n0 + rows, N)
    for start in range(n0, n1, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask = (offs_n < n1)[:, None] & mask_d[None, :]
        x = _rows_f32(X + b * sxb, offs_n, offs_d, sxn, sxd, mask)
        p = tl.exp(x - m[None, :]) / s[None, :]
        dx = p * (1.0 + x - f[None, :]) * df[None, :]
        tl.store(DX + b * N * D + offs_n[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# =========================================================================== team_gate
@triton.jit
def _gate(H, shb, shd, D, BLOCK_D: tl.constexpr):
    """(batch, channel offsets, channel mask, g = sigmoid(h[b]) in fp32): once per program."""
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    g = tl.sigmoid(tl.load(H + b * shb + offs_d * shd, mask=mask_d, other=0.0).to(tl.float32))
    return b, offs_d, mask_d, g


@triton.jit
def _channel_softmax(xp, mask):
    """Per row of ``xp = X'`` (fp32): (row max m, sum-exp z, Q = softmax_c(X'), s0 = sum_c Q X');
    rows past N (all masked) give m = 0, z = 1, Q = 0, s0 = 0."""
    xm = tl.where(mask, xp, float("-inf"))
    m = tl.max(xm, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.where(mask, tl.exp(xm - m[:, None]), 0.0)
    z = tl.sum(e, 1)
    z = tl.where(z == 0.0, 1.0, z)
    q = e / z[:, None]
    return m, z, q, tl.sum(q * tl.where(mask, xp, 0.0), 1)


@triton.jit
def _gate_rows_kernel(X, H, S0, PART, sxb, sxn, sxd, shb, shd, N, D, rows,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, batch) over tokens ``[blk * rows, (blk + 1) * rows)``: X' = sigmoid(h) X,
    s0 = sum_c softmax_c(X') X' (fp32, per token), and PART[b, blk] = (max, sum-exp) of its s0
    (the token softmax's partial state)."""
    b, offs_d, mask_d, g = _gate(H, shb, shd, D, BLOCK_D)
    blk = tl.program_id(0)
    # the running (max, sum-exp) of s0 as scalars (fp32 0-d tensors): per-token-lane vectors put a
    # value on the stack at 256 channels (sm_80)
    mt = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    zt = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    n0 = blk * rows
    for start in range(n0, tl.minimum(n0 + rows, N), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_n[:, None] & mask_d[None, :]
        x = tl.load(X + b * sxb + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=mask, other=0.0)
        s0 = _channel_softmax(g[None, :] * x.to(tl.float32), mask)[3]
        tl.store(S0 + b * N + offs_n, s0, mask=mask_n)
        s0m = tl.where(mask_n, s0, float("-inf"))
        m_new = tl.maximum(mt, tl.max(s0m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        zt = zt * tl.exp(mt - m_safe) + tl.sum(tl.exp(s0m - m_safe), 0)
        mt = m_new
    tl.store(PART + (b * tl.num_programs(0) + blk) * 2, mt)
    tl.store(PART + (b * tl.num_programs(0) + blk) * 2 + 1, zt)


@triton.jit
def _gate_apply_kernel(X, H, S0, PART, S, Y, sxb, sxn, sxd, shb, shd, N, D, rows,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, batch): the token softmax's (max, sum-exp) from all of PART[b] merged in
    block order (every program of a batch row gets the same bits), then for its tokens
    s = exp(s0 - max) / sum-exp (S, fp32) and Y = s sigmoid(h) X (Y contiguous)."""
    b, offs_d, mask_d, g = _gate(H, shb, shd, D, BLOCK_D)
    blk = tl.program_id(0)
    blocks = tl.num_programs(0)
    mv = tl.full([_PART_BLOCK], float("-inf"), tl.float32)
    zv = tl.zeros([_PART_BLOCK], tl.float32)
    for t0 in range(0, blocks, _PART_BLOCK):
        offs_t = t0 + tl.arange(0, _PART_BLOCK)
        mask_t = offs_t < blocks
        mi = tl.load(PART + (b * blocks + offs_t) * 2, mask=mask_t, other=float("-inf"))
        zi = tl.load(PART + (b * blocks + offs_t) * 2 + 1, mask=mask_t, other=0.0)
        m_new = tl.maximum(mv, mi)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        zv = zv * tl.exp(mv - m_safe) + zi * tl.exp(mi - m_safe)
        mv = m_new
    mt = tl.max(mv, 0)
    mt = tl.where(mt == float("-inf"), 0.0, mt)
    zt = tl.sum(zv * tl.exp(mv - mt), 0)
    n0 = blk * rows
    for start in range(n0, tl.minimum(n0 + rows, N), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_n[:, None] & mask_d[None, :]
        s = tl.exp(tl.load(S0 + b * N + offs_n, mask=mask_n, other=0.0) - mt) / zt
        tl.store(S + b * N + offs_n, s, mask=mask_n)
        x = tl.load(X + b * sxb + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=mask, other=0.0)
        y = s[:, None] * g[None, :] * x.to(tl.float32)
        tl.store(Y + b * N * D + offs_n[:, None] * D + offs_d[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _x_dy_rows(X, DY, b, start, N, offs_d, mask_d, sxb, sxn, sxd, syb, syn, syd, BLOCK_N: tl.constexpr):
    """Tokens ``start ... start + BLOCK_N`` of X and dY (fp32), with their token and tile masks."""
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = mask_n[:, None] & mask_d[None, :]
    return (offs_n, mask_n, mask, _rows_f32(X + b * sxb, offs_n, offs_d, sxn, sxd, mask),
            _rows_f32(DY + b * syb, offs_n, offs_d, syn, syd, mask))


@triton.jit
def _gate_bwd_rows_kernel(X, H, DY, S, DS, PART, sxb, sxn, sxd, shb, shd, syb, syn, syd, N, D, rows,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, batch): per token ds = sum_c dY X' (the gradient reaching the token
    softmax, DS fp32), and PART[b, blk] = sum over its tokens of s ds."""
    b, offs_d, mask_d, g = _gate(H, shb, shd, D, BLOCK_D)
    blk = tl.program_id(0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    n0 = blk * rows
    for start in range(n0, tl.minimum(n0 + rows, N), BLOCK_N):
        offs_n, mask_n, mask, x, dy = _x_dy_rows(X, DY, b, start, N, offs_d, mask_d, sxb, sxn, sxd, syb, syn, syd,
                                                 BLOCK_N)
        ds = tl.sum(dy * g[None, :] * x, 1)
        tl.store(DS + b * N + offs_n, ds, mask=mask_n)
        acc += tl.load(S + b * N + offs_n, mask=mask_n, other=0.0) * ds
    tl.store(PART + b * tl.num_programs(0) + blk, tl.sum(acc, 0))


@triton.jit
def _gate_bwd_kernel(X, H, DY, S, DS, PART, DX, DG, sxb, sxn, sxd, shb, shd, syb, syn, syd, N, D, rows,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, batch): sum_n s ds from all of PART[b] in block order; for its tokens
    ds0 = s (ds - sum s ds), dX' = s dY + ds0 Q (1 + X' - s0) (Q, s0 recomputed from the row),
    dX = g dX'; DG[b, blk, :] = its column sums of dX' X (fp32, reduced by _gate_dh_kernel)."""
    b, offs_d, mask_d, g = _gate(H, shb, shd, D, BLOCK_D)
    blk = tl.program_id(0)
    blocks = tl.num_programs(0)
    sds = tl.sum(tl.zeros([_PART_BLOCK], tl.float32), 0)
    for t0 in range(0, blocks, _PART_BLOCK):
        offs_t = t0 + tl.arange(0, _PART_BLOCK)
        sds += tl.sum(tl.load(PART + b * blocks + offs_t, mask=offs_t < blocks, other=0.0), 0)
    dg = tl.zeros([BLOCK_D], tl.float32)
    n0 = blk * rows
    for start in range(n0, tl.minimum(n0 + rows, N), BLOCK_N):
        offs_n, mask_n, mask, x, dy = _x_dy_rows(X, DY, b, start, N, offs_d, mask_d, sxb, sxn, sxd, syb, syn, syd,
                                                 BLOCK_N)
        s = tl.load(S + b * N + offs_n, mask=mask_n, other=0.0)
        ds0 = s * (tl.load(DS + b * N + offs_n, mask=mask_n, other=0.0) - sds)
        xp = g[None, :] * x
        m, z, q, s0 = _channel_softmax(xp, mask)
        dxp = s[:, None] * dy + ds0[:, None] * q * (1.0 + xp - s0[:, None])
        dxp = tl.where(mask, dxp, 0.0)
        tl.store(DX + b * N * D + offs_n[:, None] * D + offs_d[None, :], (g[None, :] * dxp).to(DX.dtype.element_ty),
                 mask=mask)
        dg += tl.sum(dxp * x, 0)
    tl.store(DG + (b * blocks + blk) * D + offs_d, dg, mask=mask_d)


@triton.jit
def _gate_dh_kernel(DG, H, DH, shb, shd, D, blocks, BLOCK_D: tl.constexpr):
    """Program (channel block, batch): dh = (sum over row blocks, in order, of DG[b, :, c]) g (1 - g)
    (DH contiguous, h's dtype)."""
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for i in range(0, blocks):
        acc += tl.load(DG + (b * blocks + i) * D + offs_d, mask=mask_d, other=0.0)
    g = tl.sigmoid(tl.load(H + b * shb + offs_d * shd, mask=mask_d, other=0.0).to(tl.float32))
    tl.store(DH + b * D + offs_d, (acc * g * (1.0 - g)).to(DH.dtype.element_ty), mask=mask_d)


# =========================================================================== launch configuration
#: Programs a launch touching B*N*D data aims for: two full waves on a 132-SM H100/H200, so a
#: small batch or a single long clip still fills the GPU. A fixed number (not the device's SM
#: count): the split, and with it every result bit, is the same on every GPU.
TARGET_PROGRAMS = 264
WAVE = 132              # programs a wave of those GPUs runs (one a SM): the split fills its last wave
ROW_BLOCK_DS = (64, 128, 256, 512, 1024)   # padded channel counts of the row kernels (vidkern.aot checks each)
GATE_ROWS = 32          # tokens per row program at most (team.cu's 32-row blocks): h and the gate once per 32 rows
GATE_MIN_ROWS = 8       # and at least (or one tile, if larger): the (B, blocks, D) fp32 partial dg stays <= X/4 bytes
#: The merge kernels over (B, parts, D) partial states: 24 programs a batch row at D=768 (a long
#: clip's B=1 still spreads its partials over 24 SMs).
SMALL_CONFIG = Config.of(BLOCK_D=32, num_warps=1)


def rows_config(d: int) -> Config:
    """The row kernels: a whole row of channels per token, 2048 elements per tile (the backward
    keeps about six such tiles live); 4 warps up to 256 channels, 8 above. Compiled as Triton's
    JIT specialises a launch on a channel-contiguous X (``vidkern.aot``), 8 warps at 256 channels
    spilled 8 bytes in gate_bwd on sm_90 (ptxas held it to 64 registers); 4 compile clean on Triton
    3.6 and 3.8, sm_80 and sm_90."""
    bd = max(64, triton.next_power_of_2(d))
    return Config.of(BLOCK_N=max(1, 2048 // bd), BLOCK_D=bd, num_warps=4 if bd <= 256 else 8)


def gate_rows(b: int, n: int, d: int) -> int:
    """Tokens per row program of ``team_gate``: :data:`GATE_ROWS`, halved (down to
    :data:`GATE_MIN_ROWS` or one tile of ``BLOCK_N``, whichever is larger) while the grid
    ``(cdiv(n, rows), b)`` has fewer than :data:`TARGET_PROGRAMS`. A multiple of ``BLOCK_N``
    (powers of two), so a program's tiles never straddle the next program's tokens."""
    block_n = rows_config(d).BLOCK_N
    rows, least = max(GATE_ROWS, block_n), max(GATE_MIN_ROWS, block_n)
    while rows > least and b * triton.cdiv(n, rows) < TARGET_PROGRAMS:
        rows //= 2
    return rows


#: The backward column kernel (``feature_summary``; elementwise, no reduction): 64 x 64 tiles, 16
#: warps, 8 elements a thread. Compiled as Triton's JIT specialises a launch (``vidkern.aot``: a unit
#: channel stride becomes a constant), 8 warps spilled 8 bytes in summary_bwd on sm_80 (fp16,
#: Triton 3.8; ptxas held it to 64 registers); 4 and 16 compile clean on 3.6 and 3.8. 16, not 4:
#: a launch on an X without a unit channel stride compiles another variant, in which Triton 3.6
#: lays a warp's lanes along the reduced token axis and 4 warps spilled (255 registers). Same tile,
#: so the same work a program.
SUMMARY_CONFIG = Config.of(BLOCK_N=64, BLOCK_D=64, num_warps=16)
#: The forward column kernel: one warp a program, 128 channels (4 a thread), 4 tokens a step; a
#: thread walks its channels' tokens (no cross-thread reduction), so small programs, many of them.
SUMMARY_FWD_CONFIG = Config.of(BLOCK_N=4, BLOCK_D=128, num_warps=1)
#: a column program's tokens are a multiple of this (the last split may be shorter): the backward's
#: tile; the forward's per-split state (12 bytes a channel written, 16 read back) within 11% of
#: the 128 16-bit tokens it summarises
SPLIT_ROWS = {False: 64, True: 128}
SUMMARY_FWD_WARPS = 8   # the forward's target: 8 warps an SM, enough to issue every clock (vidkern.work.machine)


def summary_config(d: int, forward: bool = False) -> Config:
    """The column kernels for ``d`` channels, the forward's (``forward``) or the backward's (fixed
    channel blocks per program, the launch grid covers ``d``)."""
    return SUMMARY_FWD_CONFIG if forward else SUMMARY_CONFIG


def summary_splits(b: int, n: int, d: int, forward: bool = False) -> tuple:
    """``(splits, rows)`` of a column kernel's token axis: ``splits`` programs of ``rows`` tokens
    (a multiple of :data:`SPLIT_ROWS`; the last may be shorter) per (channel block, batch). One
    split when ``b * cdiv(d, BLOCK_D)`` reaches the target — :data:`TARGET_PROGRAMS` programs (the
    backward's 16 warps), or :data:`SUMMARY_FWD_WARPS` warps a wave's SM (the forward); otherwise, among the split counts from the fewest
    reaching it to twice that (at most one per :data:`SPLIT_ROWS` tokens), the one whose grid fills
    its last wave of :data:`WAVE` programs best (the fewest splits among equals: less partial
    state)."""
    cfg = summary_config(d, forward)
    target = TARGET_PROGRAMS if not forward else SUMMARY_FWD_WARPS * WAVE // cfg.num_warps
    block_n, base = SPLIT_ROWS[forward], b * triton.cdiv(d, cfg.BLOCK_D)
    tiles = triton.cdiv(n, block_n)
    if base >= target or tiles == 1:
        return 1, tiles * block_n
    lo = triton.cdiv(target, base)
    best = None
    for want in range(lo, 2 * lo + 1):
        rows = triton.cdiv(tiles, min(want, tiles)) * block_n
        splits = triton.cdiv(n, rows)
        programs = base * splits
        busy = programs / (WAVE * triton.cdiv(programs, WAVE))
        if best is None or busy > best[0] + 1e-12:
            best = (busy, splits, rows)
    return best[1], best[2]


# =========================================================================== launchers
@on_input_device
def feature_summary_forward(x):
    """``x (B, N, D)`` any strides -> ``(f (B, D) in x's dtype, stats (B, 3, D) fp32)``."""
    b, n, d = x.shape
    f = torch.empty((b, d), dtype=x.dtype, device=x.device)
    stats = torch.empty((b, 3, d), dtype=torch.float32, device=x.device)
    cfg = summary_config(d, forward=True)
    splits, rows = summary_splits(b, n, d, forward=True)
    part = torch.empty((b, splits, 3, d), dtype=torch.float32, device=x.device)   # per-split states
    for bs in batch_chunks(b):
        _summary_fwd_kernel[(triton.cdiv(d, cfg.BLOCK_D), splits, bs.stop - bs.start)](
            x[bs], part[bs], *x.stride(), n, d, rows, **cfg.launch())
    # merged even from one split (then a copy of its 12-byte state a channel, plus f): one code path,
    # and every kernel runs at every shape
    for bs in batch_chunks(b):
        _summary_merge_kernel[(triton.cdiv(d, SMALL_CONFIG.BLOCK_D), bs.stop - bs.start)](
            part[bs], f[bs], stats[bs], d, splits, **SMALL_CONFIG.launch())
    return f, stats


@on_input_device
def feature_summary_backward(grad_f, x, f, stats):
    """``grad_f (B, D)`` any strides, and the forward's ``x``, ``f``, ``stats`` -> ``dx (B, N, D)``."""
    b, n, d = x.shape
    dx = torch.empty((b, n, d), dtype=x.dtype, device=x.device)
    cfg = summary_config(d)
    splits, rows = summary_splits(b, n, d)
    for bs in batch_chunks(b):
        _summary_bwd_kernel[(triton.cdiv(d, cfg.BLOCK_D), splits, bs.stop - bs.start)](
            x[bs], stats[bs], grad_f[bs], dx[bs], *x.stride(), *grad_f.stride(), n, d, rows, **cfg.launch())
    return dx


@on_input_device
def team_gate_forward(x, h):
    """``x (B, N, D)``, ``h (B, D)`` -> ``(y, s (B, N) fp32)``: the gated tokens and the token softmax
    the backward reads (it recomputes the channel softmax from the row)."""
    b, n, d = x.shape
    cfg = rows_config(d)
    rows = gate_rows(b, n, d)
    blocks = triton.cdiv(n, rows)
    s0 = torch.empty((b, n), dtype=torch.float32, device=x.device)
    s = torch.empty_like(s0)
    part = torch.empty((b, blocks, 2), dtype=torch.float32, device=x.device)   # per-program (max, sum-exp) of s0
    y = torch.empty((b, n, d), dtype=x.dtype, device=x.device)
    for bs in batch_chunks(b):
        _gate_rows_kernel[(blocks, bs.stop - bs.start)](x[bs], h[bs], s0[bs], part[bs], *x.stride(),
                                                        *h.stride(), n, d, rows, **cfg.launch())
    for bs in batch_chunks(b):
        _gate_apply_kernel[(blocks, bs.stop - bs.start)](x[bs], h[bs], s0[bs], part[bs], s[bs], y[bs], *x.stride(),
                                                         *h.stride(), n, d, rows, **cfg.launch())
    return y, s


@on_input_device
def team_gate_backward(grad_y, x, h, s):
    """``grad_y (B, N, D)`` any strides, and the forward's inputs and ``s`` -> ``(dx, dh)`` (the
    channel softmax Q is recomputed from the row)."""
    b, n, d = x.shape
    cfg = rows_config(d)
    dx = torch.empty((b, n, d), dtype=x.dtype, device=x.device)
    dh = torch.empty((b, d), dtype=h.dtype, device=h.device)
    if b == 0:
        return dx, dh
    rows = gate_rows(b, n, d)
    blocks = triton.cdiv(n, rows)
    ds = torch.empty((b, n), dtype=torch.float32, device=x.device)
    sds = torch.empty((b, blocks), dtype=torch.float32, device=x.device)      # per-program sum of s ds
    dg = torch.empty((b, blocks, d), dtype=torch.float32, device=x.device)    # per-program column sums
    for bs in batch_chunks(b):
        _gate_bwd_rows_kernel[(blocks, bs.stop - bs.start)](
            x[bs], h[bs], grad_y[bs], s[bs], ds[bs], sds[bs], *x.stride(), *h.stride(), *grad_y.stride(), n, d, rows,
            **cfg.launch())
    for bs in batch_chunks(b):
        _gate_bwd_kernel[(blocks, bs.stop - bs.start)](
            x[bs], h[bs], grad_y[bs], s[bs], ds[bs], sds[bs], dx[bs], dg[bs], *x.stride(), *h.stride(),
            *grad_y.stride(), n, d, rows, **cfg.launch())
    for bs in batch_chunks(b):
        _gate_dh_kernel[(triton.cdiv(d, SMALL_CONFIG.BLOCK_D), bs.stop - bs.start)](
            dg[bs], h[bs], dh[bs], *h.stride(), d, blocks, **SMALL_CONFIG.launch())
    return dx, dh


# =========================================================================== AOT configurations (vidkern.aot)
TEAM_KERNELS = {"summary_fwd": _summary_fwd_kernel, "summary_merge": _summary_merge_kernel,
                "summary_bwd": _summary_bwd_kernel, "gate_rows": _gate_rows_kernel,
                "gate_apply": _gate_apply_kernel, "gate_bwd_rows": _gate_bwd_rows_kernel,
                "gate_bwd": _gate_bwd_kernel, "gate_dh": _gate_dh_kernel}


def aot_specs(dtype) -> list:
    """Every configuration the TEAM launchers can launch for inputs of ``dtype`` (``vidkern.aot``):
    the column kernels at their one channel block, the merge kernels at their one block, the row
    kernels at every padded row width."""
    specs = []
    for name, fn in TEAM_KERNELS.items():
        if name in ("summary_fwd", "summary_bwd"):
            configs = [summary_config(768, forward=name == "summary_fwd")]
        elif name in ("summary_merge", "gate_dh"):
            configs = [SMALL_CONFIG]
        else:
            configs = [rows_config(bd) for bd in ROW_BLOCK_DS]
        specs += [cfg.aot("team", name, fn, dtype) for cfg in configs]
    return specs


def _aot_launch(dtype, b: int, n: int, d: int):
    def launch():
        x = torch.empty((b, n, d), dtype=dtype)
        h = torch.empty((b, d), dtype=dtype)
        f, stats = feature_summary_forward(x)
        feature_summary_backward(torch.empty_like(f), x, f, stats)
        y, s = team_gate_forward(x, h)
        team_gate_backward(torch.empty_like(y), x, h, s)
    return launch


def aot_launches(dtype) -> list:
    """``(label, launch)`` pairs: each ``launch()`` runs the TEAM launchers (feature_summary and
    team_gate, forward and backward) on CPU tensors of ``dtype`` (``vidkern.aot`` records the
    kernel launches): the reference shapes (ViT-B at B = 32 and 8, the long clip), then ViT-B's
    tokens at every padded row width."""
    launches = [(f"B={b} N={n} D=768", _aot_launch(dtype, b, n, 768)) for b, n in ((32, 1568), (8, 1568), (1, 12544))]
    launches += [(f"B=8 N=1568 D={d}", _aot_launch(dtype, 8, 1568, d)) for d in ROW_BLOCK_DS if d != 1024]
    return launches + [("B=8 N=1568 D=1024", _aot_launch(dtype, 8, 1568, 1024))]
