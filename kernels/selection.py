"""Triton kernels for STTM's meta-token selection (SPEC §3.1): greedy most-orthogonal picks.

**Selection** (``orthogonal_select``): one launch, one program per problem (a batch row; the
spatial stage's rows are ``B*T`` frames). The program computes every token's inverse norm once,
then makes the ``K - 1`` greedy picks itself: each step streams the problem's token tiles,
computes ``|cos|`` to the last pick in fp32, folds it into the running ``max |cos|`` score of
each token (``+inf`` once picked) and takes the first minimum — the exact rule of SPEC §3.1,
lowest index on ties. The scores and inverse norms live in a ``(B, 2, L)`` fp32 scratch (a few
KiB per problem, L1/L2-resident); the tokens are re-read every step. Regimes: when a problem's
``L x D`` tokens fit in L2 (every ViT-S/B stage: 196 x 768 or 784 x 768 in bf16, 0.3–1.2 MB per
problem) the per-step re-reads hit L2; a long clip (``L = 12544``, 19 MB per problem in bf16)
streams from HBM every step, and one program per problem leaves most SMs idle for small B.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import AotSpec, on_input_device

NORM_EPS = 1e-12   # vidkern.reference.NORM_EPS (this module must not import vidkern: it is vidkern.kernels)


# =========================================================================== selection
@triton.jit
def _select_kernel(X, START, OUT, WORK, sxb, sxl, sxd, L, D, K, EPS: tl.constexpr,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[b, :K] = greedy picks from START[b]; WORK[b] = (running score (L,), inverse norm (L,))."""
    b = tl.program_id(0).to(tl.int64)
    xb = X + b * sxb
    score = WORK + b * 2 * L
    inv_norm = score + L
    for t in range(0, L, BLOCK_L):
        offs = t + tl.arange(0, BLOCK_L)
        ss = tl.zeros([BLOCK_L], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            od = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(xb + offs[:, None] * sxl + od[None, :] * sxd, mask=(offs < L)[:, None] & (od < D)[None, :],
                        other=0.0).to(tl.float32)
            ss += tl.sum(x * x, 1)
        tl.store(inv_norm + offs, 1.0 / tl.maximum(tl.sqrt(ss), EPS), mask=offs < L)
        tl.store(score + offs, tl.zeros([BLOCK_L], tl.float32), mask=offs < L)
    cur = tl.load(START + b).to(tl.int32)
    tl.store(OUT + b * K, cur.to(tl.int64))
    tl.debug_barrier()   # the scratch written above is read by other threads below
    for i in range(1, K):
        inv_cur = tl.load(inv_norm + cur)
        best = float("inf")
        best_idx = L
        for t in range(0, L, BLOCK_L):
            offs = t + tl.arange(0, BLOCK_L)
            mask_l = offs < L
            dot = tl.zeros([BLOCK_L], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                od = d0 + tl.arange(0, BLOCK_D)
                c = tl.load(xb + cur * sxl + od * sxd, mask=od < D, other=0.0).to(tl.float32)
                x = tl.load(xb + offs[:, None] * sxl + od[None, :] * sxd, mask=mask_l[:, None] & (od < D)[None, :],
                            other=0.0).to(tl.float32)
                dot += tl.sum(x * c[None, :], 1)
            cos = tl.abs(dot) * tl.load(inv_norm + offs, mask=mask_l, other=0.0) * inv_cur
            w = tl.maximum(tl.load(score + offs, mask=mask_l, other=0.0), cos)
            w = tl.where(offs == cur, float("inf"), w)             # picked: never again
            tl.store(score + offs, w, mask=mask_l)
            w = tl.where(mask_l, w, float("inf"))
            tile_min = tl.min(w, 0)
            tile_arg = tl.argmin(w, 0, tie_break_left=True)
            better = tile_min < best                                # strict: earlier tiles win ties
            best_idx = tl.where(better, t + tile_arg, best_idx)
            best = tl.where(better, tile_min, best)
        cur = best_idx.to(tl.int32)
        tl.store(OUT + b * K + i, cur.to(tl.int64))
        tl.debug_barrier()


SELECT_BLOCKS = (32, 64)   # (BLOCK_L, BLOCK_D), 4 warps: 128 registers, no spills (python -m vidkern.aot)


@on_input_device
def orthogonal_select(x, k, start):
    """``x (B, L, D)`` any strides, ``start (B,)`` int64 -> int64 ``(B, k)`` in pick order.
    One program per problem on grid axis 0, which takes 2^31 - 1 programs: no batch chunks."""
    b, length, d = x.shape
    out = torch.empty((b, k), dtype=torch.long, device=x.device)
    work = torch.empty((b, 2, length), dtype=torch.float32, device=x.device)
    if b:
        _select_kernel[(b,)](x, start.contiguous(), out, work, *x.stride(), length, d, k, EPS=NORM_EPS,
                             BLOCK_L=SELECT_BLOCKS[0], BLOCK_D=SELECT_BLOCKS[1], num_warps=4)
    return out




def aot_specs(dtype) -> list:
    """The configurations :func:`orthogonal_select` launches for inputs of ``dtype`` (``vidkern.aot``)."""
    types = dict(START="*i64", OUT="*i64", WORK="*fp32", L="i32", D="i32", K="i32")
    return [AotSpec("sttm", "select", _select_kernel, dtype,
                    dict(EPS=NORM_EPS, BLOCK_L=SELECT_BLOCKS[0], BLOCK_D=SELECT_BLOCKS[1]), 4, types)]
