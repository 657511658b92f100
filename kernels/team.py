"""Triton kernels for TEAM's fused ops (SPEC §2): ``feature_summary`` and ``team_gate``,
forward and backward, fp32 accumulation for every input dtype.

``feature_summary``: one pass over X per (batch, channel block) with an online
(max, sum-exp, weighted-sum) per channel; the per-channel max and sum are saved, so the backward
``dX = P * (1 + X - f) * df`` with ``P = exp(X - max) / sum`` is one more pass (no log-sum-exp
round trip, whose float32 rounding costs about ``|lse|`` ulps).

``team_gate``: per-token work needs a whole row of channels, per-batch work a whole column of
tokens, so each direction is two row passes around a tiny (B, N) step done with torch:
forward — rows: ``X' = sigmoid(h) X``, channel softmax summary ``s0`` and its log-sum-exp; torch:
``s = softmax_n(s0)``; rows: ``Y = s X'``. Backward — rows: ``ds = dY . X'``; torch: ``ds0``;
rows: ``dX`` and per-block partial ``dg`` column sums, reduced in a fixed order (no atomics, so
results are bitwise reproducible).
"""
from __future__ import annotations

import triton
import triton.language as tl
import torch

from .launch import AotSpec, batch_chunks, on_input_device


@triton.jit
def _summary_fwd_kernel(X, F, STATS, sxb, sxn, sxd, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """f[b, c] = sum_n softmax_n(X[b, :, c]) X[b, n, c]; STATS[b, :, c] = (max, sum-exp, f in fp32)."""
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m = tl.full([BLOCK_D], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_D], tl.float32)
    w = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask = (offs_n < N)[:, None] & mask_d[None, :]
        x = tl.load(X + b * sxb + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=mask,
                    other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.where(mask, tl.exp(x - m_safe[None, :]), 0.0)
        alpha = tl.exp(m - m_safe)
        s = s * alpha + tl.sum(e, 0)
        w = w * alpha + tl.sum(e * tl.where(mask, x, 0.0), 0)
        m = m_new
    f = w / s
    tl.store(F + b * D + offs_d, f.to(F.dtype.element_ty), mask=mask_d)
    tl.store(STATS + b * 3 * D + offs_d, m, mask=mask_d)
    tl.store(STATS + b * 3 * D + D + offs_d, s, mask=mask_d)
    tl.store(STATS + b * 3 * D + 2 * D + offs_d, f, mask=mask_d)


@triton.jit
def _summary_bwd_kernel(X, STATS, DF, DX, sxb, sxn, sxd, sdfb, sdfd, N, D,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dX = P (1 + X - f) df, P = exp(X - max) / sum (DX contiguous; df any strides)."""
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m = tl.load(STATS + b * 3 * D + offs_d, mask=mask_d, other=0.0)
    s = tl.load(STATS + b * 3 * D + D + offs_d, mask=mask_d, other=1.0)
    f = tl.load(STATS + b * 3 * D + 2 * D + offs_d, mask=mask_d, other=0.0)
    df = tl.load(DF + b * sdfb + offs_d * sdfd, mask=mask_d, other=0.0).to(tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask = (offs_n < N)[:, None] & mask_d[None, :]
        x = tl.load(X + b * sxb + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - m[None, :]) / s[None, :]
        dx = p * (1.0 + x - f[None, :]) * df[None, :]
        tl.store(DX + b * N * D + offs_n[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rows(X, H, sxb, sxn, sxd, shb, shd, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program's token rows: (batch, token offsets, row-by-channel mask, gate sigmoid(h) (D,),
    X tile in fp32)."""
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_n < N)[:, None] & mask_d[None, :]
    g = tl.sigmoid(tl.load(H + b * shb + offs_d * shd, mask=mask_d, other=0.0).to(tl.float32))
    x = tl.load(X + b * sxb + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    return b, offs_n, offs_d, mask, g, x


@triton.jit
def _gate_rows_kernel(X, H, S0, LSE, sxb, sxn, sxd, shb, shd, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per token: X' = sigmoid(h) X; s0 = sum_c softmax_c(X') X'; LSE = logsumexp_c X' (fp32)."""
    b, offs_n, offs_d, mask, g, x = _gated_rows(X, H, sxb, sxn, sxd, shb, shd, N, D, BLOCK_N, BLOCK_D)
    xp = tl.where(mask, g[None, :] * x, float("-inf"))
    m = tl.max(xp, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(xp - m[:, None])
    z = tl.sum(e, 1)
    z = tl.where(z == 0.0, 1.0, z)                 # rows past N (masked out of the stores)
    s0 = tl.sum(e * tl.where(mask, xp, 0.0), 1) / z
    tl.store(S0 + b * N + offs_n, s0, mask=offs_n < N)
    tl.store(LSE + b * N + offs_n, m + tl.log(z), mask=offs_n < N)


@triton.jit
def _gate_apply_kernel(X, H, S, Y, sxb, sxn, sxd, shb, shd, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Y = s[n] sigmoid(h) X (Y contiguous)."""
    b, offs_n, offs_d, mask, g, x = _gated_rows(X, H, sxb, sxn, sxd, shb, shd, N, D, BLOCK_N, BLOCK_D)
    s = tl.load(S + b * N + offs_n, mask=offs_n < N, other=0.0)
    y = s[:, None] * g[None, :] * x
    tl.store(Y + b * N * D + offs_n[:, None] * D + offs_d[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_rows_kernel(X, H, DY, DS, sxb, sxn, sxd, shb, shd, syb, syn, syd, N, D,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per token: ds = sum_c dY X' (the gradient reaching the token softmax)."""
    b, offs_n, offs_d, mask, g, x = _gated_rows(X, H, sxb, sxn, sxd, shb, shd, N, D, BLOCK_N, BLOCK_D)
    dy = tl.load(DY + b * syb + offs_n[:, None] * syn + offs_d[None, :] * syd, mask=mask, other=0.0).to(tl.float32)
    tl.store(DS + b * N + offs_n, tl.sum(dy * g[None, :] * x, 1), mask=offs_n < N)


@triton.jit
def _gate_bwd_kernel(X, H, DY, S, DS0, DX, DG, sxb, sxn, sxd, shb, shd, syb, syn, syd, N, D,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dX' = s dY + ds0 Q (1 + X' - s0) (Q, s0 recomputed from the row); dX = g dX';
    DG[b, block, c] = this block's sum_n dX' X (reduced over blocks afterwards, in order)."""
    pid = tl.program_id(0)
    b, offs_n, offs_d, mask, g, x = _gated_rows(X, H, sxb, sxn, sxd, shb, shd, N, D, BLOCK_N, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    dy = tl.load(DY + b * syb + offs_n[:, None] * syn + offs_d[None, :] * syd, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + b * N + offs_n, mask=mask_n, other=0.0)
    ds0 = tl.load(DS0 + b * N + offs_n, mask=mask_n, other=0.0)
    xp = g[None, :] * x
    xm = tl.where(mask, xp, float("-inf"))
    m = tl.max(xm, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.where(mask, tl.exp(xm - m[:, None]), 0.0)
    z = tl.sum(e, 1)
    q = e / tl.where(z == 0.0, 1.0, z)[:, None]
    s0 = tl.sum(q * xp, 1)
    dxp = s[:, None] * dy + ds0[:, None] * q * (1.0 + xp - s0[:, None])
    dxp = tl.where(mask, dxp, 0.0)
    tl.store(DX + b * N * D + offs_n[:, None] * D + offs_d[None, :], (g[None, :] * dxp).to(DX.dtype.element_ty),
             mask=mask)
    tl.store(DG + (b * tl.num_programs(0) + pid) * D + offs_d, tl.sum(dxp * x, 0), mask=mask_d)


# =========================================================================== launchers
ROW_BLOCK_DS = (64, 128, 256, 512, 1024)   # padded channel counts of the row kernels (vidkern.aot checks each)


def rows_config(d: int) -> tuple:
    """(BLOCK_N, BLOCK_D, num_warps) of the row kernels: a whole row of channels per token,
    2048 elements per tile (the backward keeps about six such tiles live)."""
    bd = max(64, triton.next_power_of_2(d))
    return max(1, 2048 // bd), bd, 4 if bd <= 256 else 8


#: (BLOCK_N, BLOCK_D, num_warps) of the column kernels (``feature_summary`` forward and backward):
#: 8 warps, 16 elements a thread. Where X has no unit stride for Triton to specialise on (the
#: variant ``vidkern.aot`` compiles), Triton 3.6 lays a warp's lanes along the reduced token axis,
#: so each thread carries 64 / (warps along the channels) channels of the online (max, sum-exp,
#: weighted sum): 32 at 4 warps, where summary_fwd spilled (255 registers, 32-144 bytes), 16 at 8.
#: Triton 3.8 lays the lanes along the channels. Registers, sm_80/sm_90, 4 -> 8 warps: 3.6 fwd
#: 255 (spills) -> 243-244, bwd 166-255 -> 102-187; 3.8 fwd 113-155 -> 64-80, bwd 114-128 -> 63-70
#: (a channel-contiguous X, 3.8: fwd 140-143 -> 80-93). Same tile, so the same work a program.
SUMMARY_CONFIG = (64, 64, 8)


def summary_config(d: int) -> tuple:
    """(BLOCK_N, BLOCK_D, num_warps) of the column kernels for ``d`` channels (fixed: one channel
    block of 64 per program, the launch grid covers ``d``)."""
    return SUMMARY_CONFIG


@on_input_device
def feature_summary_forward(x):
    """``x (B, N, D)`` any strides -> ``(f (B, D) in x's dtype, stats (B, 3, D) fp32)``."""
    b, n, d = x.shape
    f = torch.empty((b, d), dtype=x.dtype, device=x.device)
    stats = torch.empty((b, 3, d), dtype=torch.float32, device=x.device)
    block_n, block_d, warps = summary_config(d)
    for bs in batch_chunks(b):
        _summary_fwd_kernel[(triton.cdiv(d, block_d), bs.stop - bs.start)](
            x[bs], f[bs], stats[bs], *x.stride(), n, d, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return f, stats


@on_input_device
def feature_summary_backward(grad_f, x, f, stats):
    """``grad_f (B, D)`` any strides, and the forward's ``x``, ``f``, ``stats`` -> ``dx (B, N, D)``."""
    b, n, d = x.shape
    dx = torch.empty((b, n, d), dtype=x.dtype, device=x.device)
    block_n, block_d, warps = summary_config(d)
    for bs in batch_chunks(b):
        _summary_bwd_kernel[(triton.cdiv(d, block_d), bs.stop - bs.start)](
            x[bs], stats[bs], grad_f[bs], dx[bs], *x.stride(), *grad_f.stride(), n, d, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=warps)
    return dx


@on_input_device
def team_gate_forward(x, h):
    """``x (B, N, D)``, ``h (B, D)`` -> ``(y, tok_lse (B, N) fp32, s (B, N) fp32)``."""
    b, n, d = x.shape
    block_n, block_d, warps = rows_config(d)
    s0 = torch.empty((b, n), dtype=torch.float32, device=x.device)
    tok_lse = torch.empty_like(s0)
    y = torch.empty((b, n, d), dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(n, block_n)
    for bs in batch_chunks(b):
        _gate_rows_kernel[(tiles, bs.stop - bs.start)](x[bs], h[bs], s0[bs], tok_lse[bs], *x.stride(), *h.stride(),
                                                       n, d, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    s = torch.softmax(s0, dim=-1)   # (B, N): tiny next to the two passes over X
    for bs in batch_chunks(b):
        _gate_apply_kernel[(tiles, bs.stop - bs.start)](x[bs], h[bs], s[bs], y[bs], *x.stride(), *h.stride(), n, d,
                                                        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return y, tok_lse, s


@on_input_device
def team_gate_backward(grad_y, x, h, tok_lse, s):
    """``grad_y (B, N, D)`` any strides, and the forward's inputs and ``s`` -> ``(dx, dh)``."""
    b, n, d = x.shape
    block_n, block_d, warps = rows_config(d)
    dx = torch.empty((b, n, d), dtype=x.dtype, device=x.device)
    if b == 0:
        return dx, torch.zeros_like(h)
    tiles = triton.cdiv(n, block_n)
    ds = torch.empty((b, n), dtype=torch.float32, device=x.device)
    for bs in batch_chunks(b):
        _gate_bwd_rows_kernel[(tiles, bs.stop - bs.start)](
            x[bs], h[bs], grad_y[bs], ds[bs], *x.stride(), *h.stride(), *grad_y.stride(), n, d,
            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    ds0 = s * (ds - (s * ds).sum(-1, keepdim=True))      # through the token softmax: (B, N)
    dg_parts = torch.empty((b, tiles, d), dtype=torch.float32, device=x.device)
    for bs in batch_chunks(b):
        _gate_bwd_kernel[(tiles, bs.stop - bs.start)](
            x[bs], h[bs], grad_y[bs], s[bs], ds0[bs], dx[bs], dg_parts[bs], *x.stride(), *h.stride(),
            *grad_y.stride(), n, d, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    g = torch.sigmoid(h.float())
    dh = (dg_parts.sum(1) * g * (1 - g)).to(h.dtype)     # a fixed-order reduction: reproducible
    return dx, dh


TEAM_KERNELS = {"summary_fwd": _summary_fwd_kernel, "summary_bwd": _summary_bwd_kernel,
                "gate_rows": _gate_rows_kernel, "gate_apply": _gate_apply_kernel,
                "gate_bwd_rows": _gate_bwd_rows_kernel, "gate_bwd": _gate_bwd_kernel}


def aot_specs(dtype) -> list:
    """Every configuration the TEAM launchers can launch for inputs of ``dtype`` (``vidkern.aot``):
    the column kernels at their one channel block, the row kernels at every padded row width."""
    types = dict(STATS="*fp32", S0="*fp32", LSE="*fp32", S="*fp32", DS="*fp32", DS0="*fp32", DG="*fp32",
                 N="i32", D="i32")
    specs = []
    for name, fn in TEAM_KERNELS.items():
        if name.startswith("summary"):
            configs = [summary_config(SUMMARY_CONFIG[1])]
        else:
            configs = [rows_config(bd) for bd in ROW_BLOCK_DS]
        for block_n, block_d, warps in configs:
            specs.append(AotSpec("team", name, fn, dtype, dict(BLOCK_N=block_n, BLOCK_D=block_d), warps, types))
    return specs
