"""Triton kernels for head-split sparse-dense attention (FAR, SPEC §1.2), forward and backward.

One launch runs every head: heads ``[0, Hg)`` attend globally, heads ``[Hg, H)`` only within
their group. A program owns one *tile* of ``BLOCK_M`` rows of one group (for global heads the
group is all ``N`` tokens) and loops over the key tiles of that same group only, so a
sparse-dense program visits about half the key tiles of a global one and never a score between
groups. FlashAttention-2 style: online softmax in fp32, the log-sum-exp saved for the backward,
which recomputes probabilities (a preprocessing pass computes ``delta = rowsum(dO * O)``).

Rows of a group are gathered straight from q/k/v/o in natural token order — no permuted copy is
made. The ``j``-th token of group ``g`` is ``PERM[GOFF[g] + j]``: a group-major permutation of the
tokens with group offsets, built once per pattern and grid on the host (``N`` int32s, cached) for
every pattern, the checkerboard included. A table row costs one L1-resident load; the
checkerboard's index arithmetic (div/mod on runtime ``Hp``, ``Wp``) cost 20/40/33% more
instructions in the forward/dK-dV/dQ loops on sm_90 (and was paid by the global heads too, whose
rows ``tl.where`` also computed). The debug forward checks the tables against that arithmetic
(``CHECKERBOARD``).

Program order puts the global heads' (longer) programs first. Inputs may have any strides
(a stride-0 ``dO`` is read in place). fp16/bf16 use tensor cores with fp32 accumulation; fp32
uses three TF32 products per product (``tf32x3``), whose error is at float32 level, not TF32's.
"""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _group_rows(j, g, is_global, PERM, GOFF):
    """Natural token index of the ``j``-th member of group ``g`` (``j`` a vector, in range): ``j``
    itself for a global head."""
    return tl.where(is_global, j, tl.load(PERM + tl.load(GOFF + g) + j))


@triton.jit
def _rows_ptr(base, rows, s_row, s_col, offs_d):
    """Pointers to ``rows`` x ``offs_d`` of one (batch, head) slice: int32 offsets on an int64 base,
    so gathered tiles cost one register per element, not two."""
    return base + (rows[:, None] * s_row + offs_d[None, :] * s_col)


@triton.jit
def _span(first, glen, g, is_global, PERM, GOFF, BLOCK: tl.constexpr):
    """Positions ``first .. first + BLOCK`` of a group: (in-group mask, natural token rows)."""
    offs = first + tl.arange(0, BLOCK)
    mask = offs < glen
    return mask, _group_rows(tl.where(mask, offs, 0), g, is_global, PERM, GOFF)


@triton.jit
def _load_rows(base, rows, mask, s_row, s_col, offs_d, mask_d):
    return tl.load(_rows_ptr(base, rows, s_row, s_col, offs_d), mask=mask[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _tile(pid, HG, TILES_GLOBAL, TILES, N, GOFF, BLOCK: tl.constexpr):
    """Map a program id to (head, group, first row in group, group length, is_global).

    Global heads come first: ``HG * TILES_GLOBAL`` programs, then ``TILES`` per sparse head."""
    is_global = pid < HG * TILES_GLOBAL
    rel = pid - HG * TILES_GLOBAL
    num_tiles = tl.load(TILES + 0)
    head = tl.where(is_global, pid // TILES_GLOBAL, HG + rel // tl.maximum(num_tiles, 1))
    tile = tl.where(is_global, pid % TILES_GLOBAL, rel % tl.maximum(num_tiles, 1))
    # TILES = [count, g_0, start_0, g_1, start_1, ...] for the sparse heads' tiles.
    g = tl.where(is_global, 0, tl.load(TILES + 1 + 2 * tile, mask=~is_global, other=0))
    start = tl.where(is_global, tile * BLOCK, tl.load(TILES + 2 + 2 * tile, mask=~is_global, other=0))
    glen = tl.where(is_global, N, tl.load(GOFF + g + 1) - tl.load(GOFF + g))
    return head, g, start, glen, is_global


@triton.jit(do_not_specialize=["N", "H", "HG", "TILES_GLOBAL", "HP", "WP"])
def _hsda_fwd_kernel(Q, K, V, O, LSE, PERM, GOFF, TILES, COUNT,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                     N, H, HG, TILES_GLOBAL, HP, WP, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr, DEBUG: tl.constexpr, CHECKERBOARD: tl.constexpr):
    """O = softmax(scale Q K^T) V over the program's group; LSE (natural log) per row. ``DEBUG``:
    count each program's key tiles and, for the checkerboard (``CHECKERBOARD``, ``HP x WP``
    frames), the keys its tables gathered from the other group."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    head, g, start, glen, is_global = _tile(pid, HG, TILES_GLOBAL, TILES, N, GOFF, BLOCK_M)
    head = head.to(tl.int64)
    k_base = K + b * skb + head * skh
    v_base = V + b * svb + head * svh
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m, rows_m = _span(start, glen, g, is_global, PERM, GOFF, BLOCK_M)
    q = _load_rows(Q + b * sqb + head * sqh, rows_m, mask_m, sqn, sqd, offs_d, mask_d)
    qk_scale = scale * 1.4426950408889634                     # exp2 domain
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    visits = 0
    wrong = 0
    for s in range(0, glen, BLOCK_N):
        mask_n, rows_n = _span(s, glen, g, is_global, PERM, GOFF, BLOCK_N)
        k = _load_rows(k_base, rows_n, mask_n, skn, skd, offs_d, mask_d)
        v = _load_rows(v_base, rows_n, mask_n, svn, svd, offs_d, mask_d)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows past the group end see no key
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        if DEBUG:
            visits += 1
            if CHECKERBOARD:  # every gathered key must lie in the program's group
                hw = HP * WP
                cell = rows_n % hw
                key_group = (cell // WP + cell % WP) % 2
                wrong += tl.sum((mask_n & ~is_global & (key_group != g)).to(tl.int32), 0)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(_rows_ptr(O + b * sob + head * soh, rows_m, son, sod, offs_d), out.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634
    tl.store(LSE + (b * H + head) * N + rows_m, lse, mask=mask_m)
    if DEBUG:
        base = COUNT + (b * tl.num_programs(0) + pid) * 3
        tl.store(base, visits)
        tl.store(base + 1, wrong)
        tl.store(base + 2, is_global.to(tl.int32))


@triton.jit(do_not_specialize=["N", "H"])
def _hsda_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, N, H,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, n] = sum_d dO * O (fp32): the softmax-backward row term."""
    tiles = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)                   # one flat axis: B * H * tiles may exceed 65535
    bh = (pid // tiles).to(tl.int64)
    b, head = bh // H, bh % H
    offs_m = (pid % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(_rows_ptr(O + b * sob + head * soh, offs_m, son, sod, offs_d), mask=mask, other=0.0)
    do = tl.load(_rows_ptr(DO + b * sdb + head * sdh, offs_m, sdn, sdd, offs_d), mask=mask, other=0.0)
    tl.store(DELTA + bh * N + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < N)


@triton.jit(do_not_specialize=["N", "H", "HG", "TILES_GLOBAL"])
def _hsda_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, GOFF, TILES,
                          sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                          N, H, HG, TILES_GLOBAL, scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          PRECISION: tl.constexpr):
    """dK, dV of one key tile: loop over the query tiles of the same group (dK, dV contiguous)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    head, g, start, glen, is_global = _tile(pid, HG, TILES_GLOBAL, TILES, N, GOFF, BLOCK_N)
    head = head.to(tl.int64)
    q_base = Q + b * sqb + head * sqh
    do_base = DO + b * sdb + head * sdh
    row_stats = (b * H + head) * N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_n, rows_n = _span(start, glen, g, is_global, PERM, GOFF, BLOCK_N)
    k = _load_rows(K + b * skb + head * skh, rows_n, mask_n, skn, skd, offs_d, mask_d)
    v = _load_rows(V + b * svb + head * svh, rows_n, mask_n, svn, svd, offs_d, mask_d)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    for s in range(0, glen, BLOCK_M):
        mask_m, rows_m = _span(s, glen, g, is_global, PERM, GOFF, BLOCK_M)
        q = _load_rows(q_base, rows_m, mask_m, sqn, sqd, offs_d, mask_d)
        do = _load_rows(do_base, rows_m, mask_m, sdn, sdd, offs_d, mask_d)
        lse = tl.load(LSE + row_stats + rows_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_stats + rows_m, mask=mask_m, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = rows_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + row_stats * HEAD_DIM + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + row_stats * HEAD_DIM + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["N", "H", "HG", "TILES_GLOBAL"])
def _hsda_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PERM, GOFF, TILES,
                        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                        N, H, HG, TILES_GLOBAL, scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr):
    """dQ of one query tile: loop over the key tiles of the same group (dQ contiguous)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    head, g, start, glen, is_global = _tile(pid, HG, TILES_GLOBAL, TILES, N, GOFF, BLOCK_M)
    head = head.to(tl.int64)
    k_base = K + b * skb + head * skh
    v_base = V + b * svb + head * svh
    row_stats = (b * H + head) * N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m, rows_m = _span(start, glen, g, is_global, PERM, GOFF, BLOCK_M)
    q = _load_rows(Q + b * sqb + head * sqh, rows_m, mask_m, sqn, sqd, offs_d, mask_d)
    do = _load_rows(DO + b * sdb + head * sdh, rows_m, mask_m, sdn, sdd, offs_d, mask_d)
    q_mask = mask_m[:, None] & mask_d[None, :]
    lse = tl.load(LSE + row_stats + rows_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_stats + rows_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    for s in range(0, glen, BLOCK_N):
        mask_n, rows_n = _span(s, glen, g, is_global, PERM, GOFF, BLOCK_N)
        k = _load_rows(k_base, rows_n, mask_n, skn, skd, offs_d, mask_d)
        v = _load_rows(v_base, rows_n, mask_n, svn, svd, offs_d, mask_d)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + row_stats * HEAD_DIM + rows_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# =========================================================================== packed small groups
# Sparse heads whose groups are all small (``temporal`` at T = 8: 196 groups of 8) waste a tile-based
# kernel's tiles: a 128-row tile holding one group's 8 queries issues ~128x the useful products.
# Packed tiles hold GPT whole groups of GS tokens of one equal-size bucket (``patterns.layout``),
# P rows (a power of two >= 2 GS, at least 16), with a same-group mask: the group's keys are the
# tile's own rows, so the softmax is exact in one pass, and one program does the whole backward
# (dV, dP, dQ, dK) with no atomics — every token is in exactly one tile.
@triton.jit
def _packed_rows(PERM, tile, GS, GPT, COUNT, P: tl.constexpr):
    """(valid, natural rows, group within the tile) of packed ``tile`` of a bucket of ``COUNT``
    groups of ``GS`` tokens (``PERM``: the bucket's tokens, group after group)."""
    r = tl.arange(0, P)
    gi = r // GS
    valid = (gi < GPT) & (tile * GPT + gi < COUNT)
    rows = tl.load(PERM + tile * GPT * GS + r, mask=valid, other=0)
    return valid, rows.to(tl.int32), gi


@triton.jit
def _packed_program(PERM, HG, GS, GPT, COUNT, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr):
    """This program's (batch row, head, valid, rows, group within the tile, head-dim offsets, mask):
    grid ``(tiles, sparse heads, batch)``."""
    head = (HG + tl.program_id(1)).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    valid, rows, gi = _packed_rows(PERM, tl.program_id(0), GS, GPT, COUNT, P)
    offs_d = tl.arange(0, BLOCK_D)
    return b, head, valid, rows, gi, offs_d, offs_d < HEAD_DIM


@triton.jit(do_not_specialize=["N", "H", "HG", "GS", "GPT", "COUNT"])
def _hsda_packed_fwd_kernel(Q, K, V, O, LSE, PERM,
                            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                            N, H, HG, GS, GPT, COUNT, scale,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, PRECISION: tl.constexpr):
    """O and LSE of one packed tile (sparse head ``HG + program_id(1)``): one ``P x P`` score tile,
    masked to same-group pairs."""
    b, head, valid, rows, gi, offs_d, mask_d = _packed_program(PERM, HG, GS, GPT, COUNT, HEAD_DIM, BLOCK_D, P)
    q = _load_rows(Q + b * sqb + head * sqh, rows, valid, sqn, sqd, offs_d, mask_d)
    k = _load_rows(K + b * skb + head * skh, rows, valid, skn, skd, offs_d, mask_d)
    v = _load_rows(V + b * svb + head * svh, rows, valid, svn, svd, offs_d, mask_d)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * 1.4426950408889634)
    qk = tl.where((gi[:, None] == gi[None, :]) & valid[None, :], qk, float("-inf"))
    m = tl.where(valid, tl.max(qk, 1), 0.0)                  # rows past the last group see no key
    p = tl.math.exp2(qk - m[:, None])
    l_i = tl.sum(p, 1)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / l_safe[:, None]
    tl.store(_rows_ptr(O + b * sob + head * soh, rows, son, sod, offs_d), out.to(O.dtype.element_ty),
             mask=valid[:, None] & mask_d[None, :])
    tl.store(LSE + (b * H + head) * N + rows, (m + tl.math.log2(l_safe)) / 1.4426950408889634, mask=valid)


@triton.jit(do_not_specialize=["N", "H", "HG", "GS", "GPT", "COUNT"])
def _hsda_packed_bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, PERM,
                            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                            N, H, HG, GS, GPT, COUNT, scale,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, PRECISION: tl.constexpr):
    """dQ, dK, dV of one packed tile (contiguous), from ``P`` recomputed once: 5 products."""
    b, head, valid, rows, gi, offs_d, mask_d = _packed_program(PERM, HG, GS, GPT, COUNT, HEAD_DIM, BLOCK_D, P)
    row_stats = (b * H + head) * N
    q = _load_rows(Q + b * sqb + head * sqh, rows, valid, sqn, sqd, offs_d, mask_d)
    k = _load_rows(K + b * skb + head * skh, rows, valid, skn, skd, offs_d, mask_d)
    v = _load_rows(V + b * svb + head * svh, rows, valid, svn, svd, offs_d, mask_d)
    do = _load_rows(DO + b * sdb + head * sdh, rows, valid, sdn, sdd, offs_d, mask_d)
    lse = tl.load(LSE + row_stats + rows, mask=valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_stats + rows, mask=valid, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * 1.4426950408889634)
    p = tl.math.exp2(qk - lse[:, None])
    p = tl.where((gi[:, None] == gi[None, :]) & valid[:, None] & valid[None, :], p, 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = row_stats * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    mask = valid[:, None] & mask_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=mask)
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


# =========================================================================== launch configuration
import functools  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from .limits import HSDA_HEAD_DIMS, HSDA_MAX_HEAD_DIM, PACKED_GROUP_MAX, dtype_class  # noqa: E402,F401
from .launch import TRITON_VERSION, Config, batch_chunks, dot_precision, for_triton, on_input_device  # noqa: E402


def tile_config(block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 2) -> Config:
    """The tile kernels' launch: ``BLOCK_M`` query rows by ``BLOCK_N`` key rows a tile."""
    return Config.of(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


HEAD_DIMS = HSDA_HEAD_DIMS   # compiled per head dim (a constexpr) and each checked by vidkern.aot


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two >= 32 (tl.dot needs K >= 16); the padding is masked."""
    return max(32, triton.next_power_of_2(head_dim))


#: (kind, half or fp32, padded head dim) -> config, for Triton 3.8. Found by compiling candidates
#: in order for sm_80 and sm_90 (then with both the checkerboard arithmetic and the tables), and keeping the first without spills
#: (``vidkern.aot`` re-checks every entry the running Triton gets). Gathered rows cost registers,
#: hence smaller tiles than FlashAttention's; float32 (tf32x3 products) needs smaller tiles still,
#: and has no spill-free backward at d = 128.
CONFIGS = {
    ("fwd", "half", 32): tile_config(128, 64, 8, 3), ("fwd", "half", 64): tile_config(128, 64, 8, 3),
    ("fwd", "half", 128): tile_config(128, 64, 8, 3),
    ("bwd", "half", 32): tile_config(64, 64, 8, 2), ("bwd", "half", 64): tile_config(64, 32, 4, 2),
    ("bwd", "half", 128): tile_config(32, 32, 4, 2),
    ("fwd", "fp32", 32): tile_config(32, 32, 8, 2), ("fwd", "fp32", 64): tile_config(32, 32, 4, 2),
    ("fwd", "fp32", 128): tile_config(16, 16, 2, 1),
    ("bwd", "fp32", 32): tile_config(16, 32, 2, 2), ("bwd", "fp32", 64): tile_config(16, 16, 2, 1),
}
#: Entries for Triton older than the bound, laid over CONFIGS by ``kernels.launch.for_triton``
#: (measured on 3.6.0): the same tiles with other launch parameters. Its ptxas (CUDA 12.8) puts a
#: few row-mask registers that stay live across the key loop on the stack (registers / stack bytes):
#: fwd fp32 d=64, 32x32 w=4 s=2: 168/16 (checkerboard, sm_80) -> s=1: 166-174, none;
#: bwd fp32 d=64, 16x16 w=2 s=1: bwd_dq 168/8 (checkerboard, sm_90) -> w=4: dkdv 148-162, dq 126-128.
#: Triton 3.8 keeps CONFIGS: its s=2 forward double-buffers K/V (cp.async) at 206-226 registers.
CONFIGS_BEFORE = {
    (3, 8): {("fwd", "fp32", 64): tile_config(32, 32, 4, 1), ("bwd", "fp32", 64): tile_config(16, 16, 4, 1)},
}
MAX_HEAD_DIM = HSDA_MAX_HEAD_DIM   # largest head dim with a verified forward and backward


def configs(version: tuple = None) -> dict:
    """The launch table of Triton ``version`` (default: the running one)."""
    return for_triton(CONFIGS, CONFIGS_BEFORE, version)


_ACTIVE_CONFIGS = configs(TRITON_VERSION)   # chosen once, at import


def pick_config(kind: str, head_dim: int, dtype: torch.dtype, arch: int) -> Config:
    """Launch heuristics per kernel, padded head dim and dtype (the same for sm_80 and sm_90), from
    the running Triton's table (:func:`configs`). Head dims pad up to 32, 64 or 128; unsupported
    combinations never reach here (the backend declares them, so dispatch falls back with the
    reason)."""
    key = (kind, dtype_class(dtype), block_d(head_dim))
    if key not in _ACTIVE_CONFIGS:
        raise ValueError(f"no Triton HSDA config for {kind} with head dim {head_dim} in {dtype}")
    return _ACTIVE_CONFIGS[key]


@dataclass(frozen=True)
class Tables:
    """Group layout of the sparse heads: ``perm``/``goff`` and the tile list."""

    count: int                # number of sparse tiles (kept on the host: no device sync per launch)
    perm: torch.Tensor        # int32 (N,) group-major token order
    goff: torch.Tensor        # int32 (G + 1,) group offsets
    tiles: torch.Tensor       # int32 [count, g_0, start_0, ...]


def _tiles(sizes, block: int, device) -> torch.Tensor:
    flat = [(g, s) for g, size in enumerate(sizes) for s in range(0, size, block)]
    data = [len(flat)] + [v for pair in flat for v in pair]
    return torch.tensor(data, dtype=torch.int32, device=device)


def _table_tables(ids_cpu: torch.Tensor, block: int, dev: torch.device) -> Tables:
    """Tables of the int64 host ids ``ids_cpu``, on ``dev``."""
    order = torch.argsort(ids_cpu, stable=True)
    _, counts = torch.unique_consecutive(ids_cpu[order], return_counts=True)   # present groups only
    sizes = counts.tolist()
    goff = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    goff[1:] = torch.cumsum(counts, 0)
    tiles = _tiles(sizes, block, dev)
    return Tables((len(tiles) - 1) // 2, order.to(torch.int32).to(dev), goff.to(dev), tiles)


def tables(pattern, grid, block: int, device) -> Tables:
    """Sparse-head tables for ``pattern``. Named patterns are cached per grid; an explicit pattern
    tensor in vidkern's pattern cache (``patterns.derived``: per tensor, for as long as its values
    are unchanged; typically a module buffer), so the host copy of its ids is made once, not every
    step."""
    device = torch.device(device)
    if isinstance(pattern, str):
        return _named_table_tables(pattern, tuple(grid), block, device)
    from vidkern import patterns
    return patterns.derived(pattern, "hsda-tables", lambda facts: _table_tables(facts.ids, block, device), block, device)


@functools.lru_cache(maxsize=256)
def _named_table_tables(pattern: str, grid: tuple, block: int, device: torch.device) -> Tables:
    from vidkern import patterns
    return _table_tables(patterns.group_ids(pattern, grid, "cpu"), block, device)


def _arch(device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 80  # the interpreter: any config works


_INT32_MAX = 2**31 - 1


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """The kernels take batch/head/row strides as given — views of a fused qkv projection are
    read in place — provided the layout is the one every launched variant is compiled and checked
    for (``vidkern.aot``): unit head-dim stride, 16-element-divisible other strides, a 16-byte
    aligned pointer, and int32 row offsets. Anything else (a stride-0 gradient from
    ``out.sum().backward()``, a transposed head dim, an odd offset) is copied once to a contiguous
    tensor. The head dim is 32, 64 or 128 (the backend declares it), so the copy qualifies."""
    n, d = t.shape[-2], t.shape[-1]
    ok = (t.stride(-1) == 1 and all(st % 16 == 0 and st != 0 for st in t.stride()[:-1])
          and t.data_ptr() % 16 == 0 and abs(t.stride(-2)) * max(n - 1, 0) + d <= _INT32_MAX)
    return t if ok else t.contiguous()


def _programs(tab, n, h, num_global_heads, block, packed=False):
    """(tiles per global head, programs): global heads' tiles first, then the sparse heads' unless
    they are ``packed`` (their own launches), so a launch of the first programs only is exact."""
    tiles_global = triton.cdiv(n, block)
    sparse_tiles = tab.count if num_global_heads < h and not packed else 0
    return tiles_global, num_global_heads * tiles_global + (h - num_global_heads) * sparse_tiles


#: Warps per dtype class and packed tile size ``P`` (rows), found spill-free on sm_80 and sm_90 by
#: ``vidkern.aot`` (half at 32 rows: 4 warps spill 8 bytes in the bf16 forward at d = 64 on sm_90).
PACKED_WARPS = {"half": {16: 4, 32: 2, 64: 8}, "fp32": {16: 4}}


def packed_warps(block: int, dtype) -> int:
    return PACKED_WARPS[dtype_class(dtype)][block]


@dataclass(frozen=True)
class Pack:
    """One equal-size bucket of small groups, in packed tiles of ``block`` rows."""

    index: torch.Tensor   # int64 (count * size,): the bucket's tokens, group after group
    size: int             # GS: tokens per group
    count: int            # groups in the bucket
    block: int            # P: rows per tile, a power of two >= 2 * size, at least 16

    @property
    def per_tile(self) -> int:   # GPT: whole groups per tile
        return self.block // self.size

    @property
    def tiles(self) -> int:
        return triton.cdiv(self.count, self.per_tile)


def packed_block(size: int) -> int:
    return max(16, triton.next_power_of_2(2 * size))


def packs(pattern, grid, h: int, num_global_heads: int, dtype, device):
    """The sparse heads' buckets as :class:`Pack` s when every group holds at most
    :data:`PACKED_GROUP_MAX` tokens for ``dtype`` (else None: the tile kernel runs them)."""
    if num_global_heads >= h:
        return None
    from vidkern import patterns
    buckets = patterns.layout(pattern, grid, device).buckets
    if not buckets or max(bk.size for bk in buckets) > PACKED_GROUP_MAX[dtype_class(dtype)]:
        return None
    return [Pack(bk.index, bk.size, bk.count, packed_block(bk.size)) for bk in buckets]


# =========================================================================== launchers
@on_input_device
def hsda_forward(q, k, v, grid, pattern, num_global_heads, scale, config: Config = None, debug: bool = False):
    """Launch the forward. ``q, k, v``: ``(B, H, N, d)`` any strides. Returns ``(out, lse)``
    (and the per-program ``(visits, wrong-group keys, is_global)`` counters with ``debug``).
    Small sparse groups (:func:`packs`) run in packed tiles, unless a tile ``config`` or ``debug``
    asks for the tile kernel itself."""
    b, h, n, d = q.shape
    q, k, v = (_kernel_ready(t) for t in (q, k, v))
    packed = None if (config or debug) else packs(pattern, grid, h, num_global_heads, q.dtype, q.device)
    cfg = config or pick_config("fwd", d, q.dtype, _arch(q.device))
    tab = tables(pattern if num_global_heads < h and not packed else "checkerboard", grid, cfg.BLOCK_M, q.device)
    from vidkern.sdpa import token_major_empty
    out = token_major_empty(q)            # (B, N, H, d) in memory: the projection reads it in place
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    tiles_global, programs = _programs(tab, n, h, num_global_heads, cfg.BLOCK_M, bool(packed))
    count = (torch.zeros((b, programs, 3), dtype=torch.int32, device=q.device) if debug
             else torch.empty(1, dtype=torch.int32, device=q.device))
    for bs in (batch_chunks(b) if programs else []):
        _hsda_fwd_kernel[(programs, bs.stop - bs.start)](
            q[bs], k[bs], v[bs], out[bs], lse[bs], tab.perm, tab.goff, tab.tiles, count[bs] if debug else count,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            n, h, num_global_heads, tiles_global, grid[1], grid[2], scale,
            HEAD_DIM=d, BLOCK_D=block_d(d), PRECISION=dot_precision(q.dtype), DEBUG=debug,
            CHECKERBOARD=debug and isinstance(pattern, str) and pattern == "checkerboard", **cfg.launch())
    for pk in packed or []:
        for bs in batch_chunks(b):
            _hsda_packed_fwd_kernel[(pk.tiles, h - num_global_heads, bs.stop - bs.start)](
                q[bs], k[bs], v[bs], out[bs], lse[bs], pk.index, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                n, h, num_global_heads, pk.size, pk.per_tile, pk.count, scale,
                HEAD_DIM=d, BLOCK_D=block_d(d), P=pk.block, PRECISION=dot_precision(q.dtype),
                num_warps=packed_warps(pk.block, q.dtype))
    return (out, lse, count) if debug else (out, lse)


@on_input_device
def hsda_backward(grad_out, q, k, v, out, lse, grid, pattern, num_global_heads, scale, config: Config = None):
    """Launch the backward: preprocess (delta), dK/dV per key tile, dQ per query tile; packed small
    groups (as in :func:`hsda_forward`) all three in one program per packed tile."""
    b, h, n, d = q.shape
    packed = None if config else packs(pattern, grid, h, num_global_heads, q.dtype, q.device)
    grad_out, q, k, v, out = (_kernel_ready(t) for t in (grad_out, q, k, v, out))
    cfg = config or pick_config("bwd", d, q.dtype, _arch(q.device))
    bd = block_d(d)
    delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    dq, dk, dv = (torch.empty((b, h, n, d), dtype=t.dtype, device=q.device) for t in (q, k, v))
    if b == 0:
        return dq, dk, dv
    pre_block = 64
    _hsda_bwd_preprocess_kernel[(b * h * triton.cdiv(n, pre_block),)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), n, h, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=pre_block)
    common = dict(BLOCK_D=bd, PRECISION=dot_precision(q.dtype), **cfg.launch())
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    for kernel, block, outs in ((_hsda_bwd_dkdv_kernel, cfg.BLOCK_N, (dk, dv)), (_hsda_bwd_dq_kernel, cfg.BLOCK_M, (dq,))):
        tab = tables(pattern if num_global_heads < h and not packed else "checkerboard", grid, block, q.device)
        tiles_global, programs = _programs(tab, n, h, num_global_heads, block, bool(packed))
        for bs in (batch_chunks(b) if programs else []):
            kernel[(programs, bs.stop - bs.start)](
                q[bs], k[bs], v[bs], grad_out[bs], lse[bs], delta[bs], *(t[bs] for t in outs),
                tab.perm, tab.goff, tab.tiles, *strides,
                n, h, num_global_heads, tiles_global, scale, HEAD_DIM=d, **common)
    for pk in packed or []:
        for bs in batch_chunks(b):
            _hsda_packed_bwd_kernel[(pk.tiles, h - num_global_heads, bs.stop - bs.start)](
                q[bs], k[bs], v[bs], grad_out[bs], lse[bs], delta[bs], dq[bs], dk[bs], dv[bs], pk.index, *strides,
                n, h, num_global_heads, pk.size, pk.per_tile, pk.count, scale,
                HEAD_DIM=d, BLOCK_D=bd, P=pk.block, PRECISION=dot_precision(q.dtype),
                num_warps=packed_warps(pk.block, q.dtype))
    return dq, dk, dv


# =========================================================================== AOT configurations (vidkern.aot)
TILE_KERNELS = {"fwd": _hsda_fwd_kernel, "bwd_preprocess": _hsda_bwd_preprocess_kernel,
                "bwd_dkdv": _hsda_bwd_dkdv_kernel, "bwd_dq": _hsda_bwd_dq_kernel}
PACKED_KERNELS = {"packed_fwd": _hsda_packed_fwd_kernel, "packed_bwd": _hsda_packed_bwd_kernel}


def tile_aot_spec(name: str, dtype, head_dim: int, debug: bool = False):
    """The configuration the launchers compile of tile kernel ``name`` (:data:`TILE_KERNELS`) for
    ``dtype`` and ``head_dim``: :func:`pick_config`'s tiles, warps and stages; ``debug``: the
    work-counting forward the tests launch (on the checkerboard)."""
    from .launch import AotSpec
    fn, bd = TILE_KERNELS[name], block_d(head_dim)
    if name == "bwd_preprocess":
        return AotSpec("hsda", name, fn, dtype, dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=64), 4)
    cfg = pick_config("fwd" if name == "fwd" else "bwd", head_dim, dtype, 90)
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=bd, **cfg.constexprs, PRECISION=dot_precision(dtype),
                  **({"DEBUG": debug, "CHECKERBOARD": debug} if name == "fwd" else {}))
    return AotSpec("hsda", name, fn, dtype, consts, cfg.num_warps, cfg.num_stages)


def aot_specs(dtype) -> list:
    """Every configuration the HSDA launchers can launch for inputs of ``dtype`` (``vidkern.aot``):
    per head dim, the tile kernels (:func:`tile_aot_spec`) plus the debug
    forward, and the packed-tile kernels at every tile size ``P`` (:data:`PACKED_WARPS`)."""
    from .launch import AotSpec
    specs = []
    for d in HEAD_DIMS:
        if d > MAX_HEAD_DIM[dtype_class(dtype)]:
            continue   # declared unsupported (limits.hsda_head_dim_reasons): dispatch falls back to torch
        specs.append(tile_aot_spec("bwd_preprocess", dtype, d))
        specs += [tile_aot_spec(name, dtype, d) for name in ("fwd", "bwd_dkdv", "bwd_dq")]
        specs.append(tile_aot_spec("fwd", dtype, d, debug=True))
        for name, fn in PACKED_KERNELS.items():
            for block, warps in PACKED_WARPS[dtype_class(dtype)].items():
                specs.append(AotSpec("hsda", name, fn, dtype, dict(HEAD_DIM=d, BLOCK_D=block_d(d), P=block,
                                                                    PRECISION=dot_precision(dtype)), warps))
    return specs


#: the reference shape of the AOT launches: ViT-B's 12 heads over 8x14x14 tokens, 6 global (two
#: batch rows: the batch changes no specialisation)
_AOT_GRID, _AOT_HEADS = (8, 14, 14), 12


def _aot_launch(dtype, d, grid, pattern, num_global_heads, debug=False):
    def launch():
        b, n = 2, math.prod(grid)
        q, k, v, grad = (torch.empty((b, _AOT_HEADS, n, d), dtype=dtype) for _ in range(4))
        if debug:
            return hsda_forward(q, k, v, grid, pattern, num_global_heads, d ** -0.5, debug=True)
        out, lse = hsda_forward(q, k, v, grid, pattern, num_global_heads, d ** -0.5)
        # the backward reads the forward's (B, N, H, d) output, as the autograd Function hands it over
        hsda_backward(grad, q, k, v, out, lse, grid, pattern, num_global_heads, d ** -0.5)
    return launch


def aot_launches(dtype) -> list:
    """``(label, launch)`` pairs: each ``launch()`` runs the HSDA launchers (forward and backward)
    on CPU tensors of ``dtype``; ``vidkern.aot`` records their kernel launches instead of running
    them. The reference shape (ViT-B, 8x14x14 tokens, checkerboard 6+6) at every head dim, then
    what reaches the other configurations: an explicit two-group pattern (its own tables), the
    temporal heads (packed tiles of P = 16, 32, 64 rows: groups of 8, 16, 32 frames), the debug
    forward."""
    launches = []
    for d in HEAD_DIMS:
        if d > MAX_HEAD_DIM[dtype_class(dtype)]:
            continue
        n = math.prod(_AOT_GRID)
        halves = (torch.arange(n) >= n // 2).long()
        launches += [(f"d={d} checkerboard 6+6", _aot_launch(dtype, d, _AOT_GRID, "checkerboard", 6)),
                     (f"d={d} two halves 6+6", _aot_launch(dtype, d, _AOT_GRID, halves, 6)),
                     (f"d={d} checkerboard debug", _aot_launch(dtype, d, _AOT_GRID, "checkerboard", 6, debug=True))]
        for frames in (8, 16, 32):
            grid = (frames, 14 * 8 // frames, 14) if frames < 32 else (32, 7, 7)
            if frames <= PACKED_GROUP_MAX[dtype_class(dtype)]:
                launches.append((f"d={d} temporal T={frames} 6+6", _aot_launch(dtype, d, grid, "temporal", 6)))
    return launches
