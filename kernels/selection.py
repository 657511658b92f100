"""Triton kernels for STTM's meta-token selection (SPEC §3.1): greedy most-orthogonal picks.

``orthogonal_select(x (B, L, D), k, start (B,)) -> int64 (B, k)``: ``start[b]`` first, then
``k - 1`` times the unchosen token ``j`` minimising ``max_{c chosen} |cos(x_j, x_c)|``, lowest
index on ties. Cosines in float32 (products of bf16/fp16 inputs are exact in float32; float32
inputs go through three TF32 products, ``kernels.launch.dot_precision``).

**Design (the Gram regime, L <= GREEDY_MAX_L = 16384).** Each greedy step needs the ``|cos|`` of
every token to the last pick: one row of the problem's ``|cos|`` Gram matrix. So the work is split
into two launches per chunk of problems:

1. ``_gram_kernel`` computes ``G[b] = |xh xh^T|`` in float32 once, ``xh = x / max(|x|, eps)``, on
   tensor cores (``tl.dot``, float32 accumulation): one program per *pair* of ``BLOCK``-row tiles
   ``tm <= tn`` (G is symmetric: the upper triangle of tiles is computed and each off-diagonal
   tile is stored twice, as itself and transposed), flat on grid axis 0 (``chunk * T(T+1)/2``
   programs, ``T = ceil(L / BLOCK)``). The rows' squared norms are summed from the same tiles
   the product loads, so X is read ``L (T + 1) D`` elements per problem (the usual tiled-matmul
   re-read, half of it thanks to symmetry) and G written once, ``4 L^2`` bytes.
2. ``_greedy_kernel``: one program per problem keeps the running scores ``max |cos|`` of all
   ``L`` tokens in registers (a ``[BLOCK_L = next_power_of_2(L)]`` float32 tensor, ``+inf`` once
   picked, ``num_warps`` grown with ``BLOCK_L`` so it stays spill-free) and per step reads just
   the row ``G[cur, :]`` — only its unpicked entries (``L - i`` floats at step ``i``: a picked
   token's score is ``+inf`` whatever it reads) — folds it in with ``max`` and takes the first
   minimum (the minimum, then the lowest index holding it: two plain block reductions, cheaper than
   one of (value, index) pairs). The Gram kernel writes ``+inf`` on the diagonal, so folding in
   the pick's own row is what marks it taken. Per step: at most ``4 L`` bytes read and 8 written,
   no scratch writes, no re-read of X.

*Memory.* The Gram scratch is ``4 L^2`` bytes per problem; problems are processed in chunks of
:func:`chunk_problems`, as many as fit in :func:`scratch_budget` — ``GRAM_FREE_SHARE`` (half) of the
memory the device has free at the call, at least one problem — and the launches of a chunk run in
order on one stream, so one scratch buffer serves every chunk. Sized from free memory, not a fixed
cap: the problems of one chunk run their greedy steps side by side, one SM each, while successive
chunks wait for each other, so a fixed 2 GiB (three long clips) made a batch of 8 long clips three
greedy launches in series (31.8 ms on the work model, H200, where one chunk takes 11.9; the
scratch is 5 GB). sttm_vit_b's stages at B = 32 take 39 MB and 79 MB.

*Regimes.* sttm_vit_b stage 1 (B*T problems of L=196) and stage 2 (B problems of L=784): the
Gram launch fills the machine; the greedy launch has one program per problem. The long clip
(1 x 12544, BLOCK_L = 16384, 32 warps): one SM makes all 6271 (9407 with scores) picks, each
reading one 50 KB Gram row from HBM — instead of re-reading all 19 MB of X per step as the
streaming kernel below does.

**Fallback (L > GREEDY_MAX_L: scores no longer fit in registers, and one problem's Gram would
exceed 1 GiB).** ``_stream_select_kernel``, one program per problem, keeps the running scores and
inverse norms in a ``(B, 2, L)`` float32 scratch and re-computes ``|cos|`` to the last pick from X
at every step: correct, needs only O(L) scratch, but reads ``L D`` values per step (slow: a
long clip of 40000 tokens re-reads X 20000 times).

Under Triton's interpreter (``TRITON_INTERPRET=1``) bf16 ``tl.dot`` is computed wrongly
(tests/test_triton_backend.py::test_interpreter_bf16_dot_is_still_wrong), so there the Gram
kernel upcasts bf16 tiles to float32 and multiplies in IEEE float32 — the same values: bf16
products are exact in float32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import Config, dot_precision, on_input_device
from .limits import NORM_EPS  # SPEC §3.1's eps (its one home: kernels.limits)


# =========================================================================== helpers
@triton.jit
def _inv_norms(xb, offs, sxl, sxd, L, D, EPS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """``1 / max(|x_l|, eps)`` (fp32, IEEE square root) of rows ``offs`` of one problem, read once."""
    ss = tl.zeros([BLOCK_L], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        od = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(xb + offs[:, None] * sxl + od[None, :] * sxd, mask=(offs < L)[:, None] & (od < D)[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, 1)
    return 1.0 / tl.maximum(tl.sqrt_rn(ss), EPS)


# =========================================================================== Gram regime
@triton.jit
def _inv_norm_kernel(X, INV, sxb, sxl, sxd, L, D, TL, EPS: tl.constexpr, BLOCK_L: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """INV[b, l] = 1 / max(|x[b, l]|, eps), float32 (B, L); program ``b * TL + t`` takes rows
    ``t * BLOCK_L ...`` of problem ``b``."""
    pid = tl.program_id(0)
    b = (pid // TL).to(tl.int64)
    offs = (pid % TL) * BLOCK_L + tl.arange(0, BLOCK_L)
    tl.store(INV + b * L + offs, _inv_norms(X + b * sxb, offs, sxl, sxd, L, D, EPS, BLOCK_L, BLOCK_D), mask=offs < L)


@triton.jit
def _gram_kernel(X, INV, G, sxb, sxl, sxd, L, D, T, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """G[b, i, j] = |x_i . x_j| INV[b, i] INV[b, j], float32 (B, L, L), for the tile pair
    ``(tm, tn)``, ``tm <= tn``, numbered ``p = tn (tn + 1) / 2 + tm`` within problem ``b``."""
    pid = tl.program_id(0)
    pairs = T * (T + 1) // 2
    b = (pid // pairs).to(tl.int64)
    p = pid % pairs
    tn = ((tl.sqrt_rn(8.0 * p.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)   # ±1 from rounding: fixed below
    tn = tl.where(tn * (tn + 1) // 2 > p, tn - 1, tn)
    tn = tl.where((tn + 1) * (tn + 2) // 2 <= p, tn + 1, tn)
    tm = p - tn * (tn + 1) // 2
    rm = tm * BLOCK + tl.arange(0, BLOCK)
    rn = tn * BLOCK + tl.arange(0, BLOCK)
    xb = X + b * sxb
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        od = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(xb + rm[:, None] * sxl + od[None, :] * sxd, mask=(rm < L)[:, None] & (od < D)[None, :], other=0.0)
        c = tl.load(xb + rn[:, None] * sxl + od[None, :] * sxd, mask=(rn < L)[:, None] & (od < D)[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), tl.trans(c.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(c), acc, input_precision=PRECISION)
    inv_m = tl.load(INV + b * L + rm, mask=rm < L, other=0.0)
    inv_n = tl.load(INV + b * L + rn, mask=rn < L, other=0.0)
    cos = tl.abs(acc) * inv_m[:, None] * inv_n[None, :]
    # the diagonal is +inf: folding in the pick's own row marks the pick taken, so the greedy step
    # needs no compare-and-select per score for it
    cos = tl.where(rm[:, None] == rn[None, :], float("inf"), cos)
    gb = G + b * L * L
    mask = (rm < L)[:, None] & (rn < L)[None, :]
    tl.store(gb + rm[:, None] * L + rn[None, :], cos, mask=mask)
    # the mirror tile G[rn, rm] = cos^T (a diagonal tile is its own mirror)
    tl.store(gb + rn[:, None] * L + rm[None, :], tl.trans(cos), mask=tl.trans(mask) & (tm != tn))


@triton.jit
def _greedy_kernel(G, START, OUT, L, K, BLOCK_L: tl.constexpr):
    """OUT[b, :K] = greedy picks from START[b] over the |cos| Gram matrix G[b] (L, L) float32."""
    b = tl.program_id(0).to(tl.int64)
    gb = G + b * L * L
    offs = tl.arange(0, BLOCK_L)
    score = tl.where(offs < L, tl.zeros([BLOCK_L], tl.float32), float("inf"))   # padding: never picked
    cur = tl.load(START + b).to(tl.int32)
    tl.store(OUT + b * K, cur.to(tl.int64))
    for i in range(1, K):
        live = score < float("inf")                                    # unpicked: only these read G
        row = tl.load(gb + cur.to(tl.int64) * L + offs, mask=live, other=0.0)
        score = tl.maximum(score, row)                                 # G[cur, cur] = +inf: cur taken
        best = tl.min(score, 0)
        cur = tl.min(tl.where(score == best, offs, BLOCK_L), 0)        # first minimum = lowest index
        tl.store(OUT + b * K + i, cur.to(tl.int64))


# =========================================================================== streaming fallback
@triton.jit
def _stream_select_kernel(X, START, OUT, WORK, sxb, sxl, sxd, L, D, K, EPS: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[b, :K] = greedy picks from START[b]; WORK[b] = (running score (L,), inverse norm (L,)).
    Re-reads X every step (the fallback for L > GREEDY_MAX_L)."""
    b = tl.program_id(0).to(tl.int64)
    xb = X + b * sxb
    score = WORK + b * 2 * L
    inv_norm = score + L
    for t in range(0, L, BLOCK_L):
        offs = t + tl.arange(0, BLOCK_L)
        tl.store(inv_norm + offs, _inv_norms(xb, offs, sxl, sxd, L, D, EPS, BLOCK_L, BLOCK_D), mask=offs < L)
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


# =========================================================================== launch configuration
GREEDY_MAX_L = 16384            # largest L of the register (Gram) regime: 16 scores per thread at 32 warps
GREEDY_MIN_BLOCK = 128          # smallest BLOCK_L (fewer configurations; padding lanes issue no loads)
GRAM_FREE_SHARE = 0.5           # share of the device's free memory the Gram scratch may take
GRAM_SCRATCH_BYTES = 2 ** 31    # the scratch budget where free memory is not known (not CUDA)
#: The Gram kernel: 16-bit inputs on the bf16/fp16 tensor cores; float32 as tf32x3 (three
#: products: more registers per tile, so smaller tiles)
GRAM_BLOCKS = {"half": Config.of(BLOCK=128, BLOCK_D=32, num_warps=8, num_stages=3),
               "fp32": Config.of(BLOCK=64, BLOCK_D=16, num_warps=4, num_stages=3)}
NORM_BLOCKS = Config.of(BLOCK_L=32, BLOCK_D=64)     # the inverse-norm kernel
SELECT_BLOCKS = Config.of(BLOCK_L=32, BLOCK_D=64)   # the streaming fallback


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gram_config(dtype) -> Config:
    """:func:`_gram_kernel` for inputs of ``dtype``."""
    return GRAM_BLOCKS["fp32" if dtype == torch.float32 else "half"]


def greedy_config(length: int) -> Config:
    """:func:`_greedy_kernel` for ``length`` tokens: 4 warps up to 512 scores, then more warps, 4
    scores per thread, up to 32 warps (8 per thread at BLOCK_L = 8192, 16 at 16384). A step is a
    serial chain (load, max, two block reductions): more warps issue it sooner — one problem per SM,
    a warp per scheduler issues at most every other clock (``vidkern.work.machine``), two keep it
    busy (sm_90 SASS at 1024 scores: 111 instructions a warp a step on 4 warps, 80 on 8)."""
    block = max(GREEDY_MIN_BLOCK, triton.next_power_of_2(length))
    return Config.of(BLOCK_L=block, num_warps=min(32, max(4, block // 128)))


def scratch_budget(device: torch.device) -> int:
    """Bytes of Gram scratch one call may take on ``device``: ``GRAM_FREE_SHARE`` of its free memory
    on CUDA (the driver's free memory plus the blocks torch's caching allocator holds unused, which
    the scratch reuses first), ``GRAM_SCRATCH_BYTES`` elsewhere — and while a CUDA graph is being
    captured, whose private memory pool would keep the scratch for the graph's lifetime."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return GRAM_SCRATCH_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(GRAM_FREE_SHARE * (free + cached))


def chunk_problems(length: int, budget: int = None) -> int:
    """Problems per Gram-scratch chunk: float32 ``(L, L)`` matrices within ``budget`` bytes
    (default ``GRAM_SCRATCH_BYTES``), at least one."""
    return max(1, (GRAM_SCRATCH_BYTES if budget is None else budget) // (4 * length * length))


# =========================================================================== launcher
@on_input_device
def orthogonal_select(x, k, start):
    """``x (B, L, D)`` any strides, ``start (B,)`` int64 -> int64 ``(B, k)`` in pick order.

    ``L <= GREEDY_MAX_L``: per chunk of :func:`chunk_problems` problems (the Gram scratch within
    :func:`scratch_budget`), ``_gram_kernel`` then
    ``_greedy_kernel`` (``k = 1``: the greedy kernel alone, no Gram). Larger ``L``: the streaming
    fallback, one launch. Every grid is on axis 0 (2^31 - 1 programs): no batch chunks needed."""
    b, length, d = x.shape
    out = torch.empty((b, k), dtype=torch.long, device=x.device)
    if b == 0:
        return out
    start = start.contiguous()
    if length > GREEDY_MAX_L:
        work = torch.empty((b, 2, length), dtype=torch.float32, device=x.device)
        _stream_select_kernel[(b,)](x, start, out, work, *x.stride(), length, d, k, EPS=NORM_EPS,
                                    **SELECT_BLOCKS.launch())
        return out
    greedy = greedy_config(length)
    if k == 1:   # the start alone: no Gram matrix needed
        dummy = torch.empty(1, dtype=torch.float32, device=x.device)   # never read
        _greedy_kernel[(b,)](dummy, start, out, length, k, **greedy.launch())
        return out
    gram_cfg = gram_config(x.dtype)
    tiles = triton.cdiv(length, gram_cfg.BLOCK)
    pairs = tiles * (tiles + 1) // 2
    per = chunk_problems(length, scratch_budget(x.device))
    gram = torch.empty((min(b, per), length, length), dtype=torch.float32, device=x.device)
    inv = torch.empty((b, length), dtype=torch.float32, device=x.device)
    nl = triton.cdiv(length, NORM_BLOCKS.BLOCK_L)
    _inv_norm_kernel[(b * nl,)](x, inv, *x.stride(), length, d, nl, EPS=NORM_EPS, **NORM_BLOCKS.launch())
    upcast = x.dtype == torch.bfloat16 and interpreting()
    for s in range(0, b, per):
        e = min(b, s + per)
        xs = x[s:e]
        _gram_kernel[((e - s) * pairs,)](xs, inv[s:e], gram, *xs.stride(), length, d, tiles,
                                         PRECISION=dot_precision(x.dtype), UPCAST=upcast, **gram_cfg.launch())
        _greedy_kernel[(e - s,)](gram, start[s:e], out[s:e], length, k, **greedy.launch())
    return out


# =========================================================================== AOT configurations (vidkern.aot)
def aot_specs(dtype) -> list:
    """The configurations :func:`orthogonal_select` launches for inputs of ``dtype`` (``vidkern.aot``):
    the Gram kernel, the greedy kernel at every ``BLOCK_L`` from ``GREEDY_MIN_BLOCK`` to
    ``next_power_of_2(GREEDY_MAX_L)``, the streaming fallback."""
    specs = [NORM_BLOCKS.aot("sttm", "select_norm", _inv_norm_kernel, dtype, EPS=NORM_EPS),
             gram_config(dtype).aot("sttm", "select_gram", _gram_kernel, dtype, PRECISION=dot_precision(dtype),
                                    UPCAST=False)]
    length = GREEDY_MIN_BLOCK
    while length <= triton.next_power_of_2(GREEDY_MAX_L):
        specs.append(greedy_config(length).aot("sttm", "select_greedy", _greedy_kernel, dtype))
        length *= 2
    specs.append(SELECT_BLOCKS.aot("sttm", "select_stream", _stream_select_kernel, dtype, EPS=NORM_EPS))
    return specs


def _aot_launch(dtype, b: int, length: int, k: int, d: int = 768):
    def launch():
        x = torch.empty((b, length, d), dtype=dtype)
        orthogonal_select(x, k, torch.zeros(b, dtype=torch.long))
    return launch


def aot_launches(dtype) -> list:
    """``(label, launch)`` pairs: each ``launch()`` runs :func:`orthogonal_select` on CPU tensors of
    ``dtype`` (``vidkern.aot`` records the kernel launches): the reference shapes (sttm_vit_b's
    stages with their ``K = 1.5 L'`` candidates, the long clip), then a length per greedy width
    and one past :data:`GREEDY_MAX_L` (the streaming fallback)."""
    launches = [("256 x 196 -> 147", _aot_launch(dtype, 256, 196, 147)),
                ("32 x 784 -> 588", _aot_launch(dtype, 32, 784, 588)),
                ("1 x 12544 -> 6272", _aot_launch(dtype, 1, 12544, 6272))]
    length = GREEDY_MIN_BLOCK
    while length <= triton.next_power_of_2(GREEDY_MAX_L):
        launches.append((f"2 x {length} -> {length // 2}", _aot_launch(dtype, 2, length, length // 2)))
        length *= 2
    return launches + [(f"1 x {GREEDY_MAX_L + 1} -> 8", _aot_launch(dtype, 1, GREEDY_MAX_L + 1, 8))]
