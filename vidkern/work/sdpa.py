"""Work model of hsda's SDPA strategies (``vidkern.sdpa``): ``split`` and ``views``.

The SDPA calls run library kernels, which are not ours to count. torch's SDPA picks its backends
by a fixed priority with FlashAttention-2 first (``flash_attention, efficient_attention, math,
cudnn_attention``: pytorch/pytorch issue 138907), so each 16-bit call is priced at **FA2's
published H100 rate** for its sequence length and head dim (:data:`PUBLISHED`,
:func:`published_tflops`), FLOPs counted as the FA3 paper does (``4 N^2 d`` per sequence and head
forward, 2.5x that backward). Its counted launches (what such a kernel issues: below) stay for
the bytes columns; a float32 call (the memory-efficient kernel on FMA units, no published
figure) is priced by its terms like our own launches:

- forward: a program per ``FLASH_BLOCK``-row query tile of each sequence; it reads its Q tile,
  every K and V tile of the sequence, and writes its O tile and log-sum-exp; ``2`` tile products
  per (query tile, key tile), padding included (a 128-row tile over a group of 8 issues the
  whole tile).
- backward: a ``dO . O`` pre-pass; a program per key tile that reads K, V once, loops over the
  query tiles (Q, dO, lse, delta) and accumulates dQ in fp32 (one read-modify-write of the
  query tile's ``d`` fp32 accumulators per key tile), ``5`` tile products per pair; a pass that
  converts the fp32 dQ.

What the strategies add around SDPA is counted as they issue it:

- ``split``: the global heads' SDPA call, the custom op on the sparse head slice (the Triton
  formula of :mod:`vidkern.work.hsda` at that slice, exactly), and the ``torch.cat`` that lays
  the two parts out as ``(B, N, H, d)``: one read and one write of the output.
- ``views``: the global heads' call, one call per run of equal-size groups (``sdpa._runs``) over
  ``B * heads * count`` sequences of ``size`` tokens, a cat of the runs when there are several,
  and the cat of the two head parts.

The backward of a cat is narrowing (views), so it adds no traffic. ``split`` is modelled in
natural token order (its default), ``views`` in grouped order (its only one).
:func:`dense_launches` is the baseline: the same SDPA call on every head. :func:`output_copy` is the
copy that the ``(B, N, H, d)`` output layout of every path saves the attention module.
"""
from __future__ import annotations

import math

import bisect

from . import SMS, Launch, Shape, cdiv, formula, resident_set

FLASH_BLOCK = 128     # query and key tile rows of FA2/cuDNN's d <= 128 kernels on sm_80/sm_90

#: published attention TFLOP/s on H100 SXM5, bf16/fp16, non-causal, 16k tokens a batch:
#: (kernel, direction, head dim) -> rates at :data:`PUBLISHED_LENGTHS` tokens a sequence
#: (FlashAttention-3 paper, arXiv 2407.08608, figures 5 and 6; docs/verify.md has the table)
PUBLISHED_LENGTHS = (512, 1024, 2048, 4096, 16384)
PUBLISHED = {
    ("fa2", "forward", 64): (282, 306, 318, 321, 324), ("fa2", "forward", 128): (309, 350, 362, 368, 370),
    ("fa2", "backward", 64): (198, 238, 264, 279, 291), ("fa2", "backward", 128): (214, 260, 291, 310, 322),
    ("cudnn", "forward", 64): (335, 373, 395, 408, 413), ("cudnn", "forward", 128): (497, 574, 617, 609, 595),
    ("cudnn", "backward", 64): (266, 348, 395, 417, 433), ("cudnn", "backward", 128): (305, 408, 465, 499, 516),
    ("fa3", "forward", 64): (333, 392, 460, 476, 497), ("fa3", "forward", 128): (467, 565, 625, 638, 648),
    ("fa3", "backward", 64): (272, 363, 422, 453, 474), ("fa3", "backward", 128): (316, 424, 501, 542, 561),
}
SDPA_KERNEL = "fa2"


def published_tflops(kernel: str, direction: str, d: int, length: int) -> float:
    """The published rate of ``kernel`` at head dim ``d`` and ``length`` tokens a sequence: linear
    in log2(length) between the published lengths and flat past the ends; ``d`` between 64 and
    128 interpolated linearly, ``d < 64`` at the d=64 rate times ``d / 64`` (the exps per pair do
    not shrink with ``d``), ``d > 128`` at the d=128 rate. A sequence shorter than 512 tokens also
    pays its tile padding: ``(length / (128 ceil(length / 128)))^2`` of the 512-token rate."""
    import math

    def at(dim):
        rates = PUBLISHED[(kernel, direction, dim)]
        x = math.log2(min(max(length, PUBLISHED_LENGTHS[0]), PUBLISHED_LENGTHS[-1]))
        xs = [math.log2(v) for v in PUBLISHED_LENGTHS]
        i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
        t = (x - xs[i]) / (xs[i + 1] - xs[i])
        return rates[i] + t * (rates[i + 1] - rates[i])
    if d <= 64:
        rate = at(64) * d / 64
    elif d >= 128:
        rate = at(128)
    else:
        rate = at(64) + (d - 64) / 64 * (at(128) - at(64))
    if length < PUBLISHED_LENGTHS[0]:
        rate *= (length / (FLASH_BLOCK * cdiv(length, FLASH_BLOCK))) ** 2
    return rate


def published_us(kernel: str, direction: str, d: int, length: int, seqs: int) -> float:
    """Time of ``seqs`` independent sequences (sequence x head) of ``length`` tokens at the
    published rate (FLOPs: ``4 length^2 d`` forward, 2.5x backward)."""
    flops = 4 * length * length * d * seqs * (2.5 if direction == "backward" else 1)
    return flops / (published_tflops(kernel, direction, d, length) * 1e12) * 1e6


def _rate(shape: Shape) -> str:
    # fp32 SDPA on CUDA runs the memory-efficient kernel on FMA units (no TF32 by default)
    return "fp32" if shape.dtype == "fp32" else shape.dtype


def copy_launch(name: str, nbytes: int) -> Launch:
    """An elementwise copy: bandwidth-bound, with blocks enough to fill every SM."""
    return Launch(name, max(SMS, cdiv(nbytes, 1 << 16)), nbytes)


def flash_launches(direction: str, shape: Shape, seqs: int, size: int, tag: str) -> list:
    """A flash kernel over ``seqs`` independent sequences of ``size`` tokens (module
    docstring); ``tag`` names the call in the kernel column."""
    if not seqs or not size:
        return []
    d, isz, bk = shape.d, shape.itemsize, FLASH_BLOCK
    tiles = math.ceil(size / bk)
    slab = seqs * size * d * isz
    products = seqs * tiles * tiles * bk * bk * d
    timed = None if shape.dtype == "fp32" else published_us(SDPA_KERNEL, direction, d, size, seqs)
    # compulsory: Q, K, V, O (and lse); re-read: a sequence's K, V (backward: Q, dO)
    kv = 2 * size * d * isz
    if direction == "forward":
        nbytes = seqs * size * d * isz * (1 + 2 * tiles) + slab + seqs * size * 4
        return [Launch(f"sdpa.flash_fwd[{tag}]", seqs * tiles, nbytes, 2 * products, rate=_rate(shape),
                       config=dict(BLOCK=bk, seqs=seqs, size=size, priced=SDPA_KERNEL if timed else "terms"),
                       unique=4 * slab + seqs * size * 4, working_set=resident_set(tiles, kv, seqs),
                       published_us=timed)]
    rows = seqs * size
    pre = Launch(f"sdpa.flash_bwd_dot_do_o[{tag}]", max(1, cdiv(rows, 64)), 2 * slab + rows * 4)
    per_key_tile = rows * (2 * d * isz + 8 + 2 * 4 * d)          # Q, dO, lse, delta; dQ fp32 read+write
    main = Launch(f"sdpa.flash_bwd[{tag}]", seqs * tiles, 2 * slab + tiles * per_key_tile + 2 * slab,
                  5 * products, rate=_rate(shape),
                  config=dict(BLOCK=bk, seqs=seqs, size=size, priced=SDPA_KERNEL if timed else "terms"),
                  unique=7 * slab + rows * (8 + 8 * d), working_set=resident_set(tiles, kv + size * 8, seqs),
                  published_us=timed)
    convert = copy_launch(f"sdpa.flash_bwd_convert_dq[{tag}]", rows * d * (4 + isz))
    if timed is not None:    # the published time is the whole backward, its pre- and post-pass included
        return [Launch(main.kernel, main.programs, pre.bytes + main.bytes + convert.bytes, main.macs,
                       rate=main.rate, config=dict(main.config, kernels=3), unique=main.unique + pre.bytes + convert.bytes,
                       working_set=main.working_set, published_us=timed)]
    return [pre, main, convert]


def _slab(shape: Shape, heads: int) -> int:
    return shape.B * heads * shape.N * shape.d * shape.itemsize


def _sparse_shape(shape: Shape) -> Shape:
    from dataclasses import replace
    return replace(shape, H=shape.H - shape.global_heads, num_global_heads=0)


def _split_launches(direction: str, shape: Shape, sparse: list) -> list:
    """Global heads on SDPA, then ``sparse`` (the sparse heads' launches), then the head cat."""
    hg, h = shape.global_heads, shape.H
    out = flash_launches(direction, shape, shape.B * hg, shape.N, "global heads")
    out += sparse
    if direction == "forward" and 0 < hg < h:
        out.append(copy_launch("aten.cat[heads]", 2 * _slab(shape, h)))
    return out


@formula("hsda", "split")
def hsda_split(direction: str, shape: Shape) -> list:
    sparse = []
    if shape.global_heads < shape.H:
        from . import launches
        sparse = launches("hsda", direction, "triton", _sparse_shape(shape))
    return _split_launches(direction, shape, sparse)


@formula("hsda", "views")
def hsda_views(direction: str, shape: Shape) -> list:
    from .. import sdpa
    from .hsda import group_sizes
    hs = shape.H - shape.global_heads
    sparse = []
    if hs:
        runs = sdpa._runs(group_sizes(shape))
        for start, count, size in runs:
            sparse += flash_launches(direction, shape, shape.B * hs * count, size, f"{count}x{size} groups")
        if direction == "forward" and len(runs) > 1:
            sparse.append(copy_launch("aten.cat[runs]", 2 * _slab(shape, hs)))
    return _split_launches(direction, shape, sparse)


def dense_launches(direction: str, shape: Shape) -> list:
    """Dense attention on every head (the baseline HSDA must beat): the flash kernel over
    ``B * H`` sequences of ``N`` tokens."""
    return flash_launches(direction, shape, shape.B * shape.H, shape.N, "dense, all heads")


def dense_us(direction: str, shape: Shape) -> float:
    return sum(r.model_us for r in dense_launches(direction, shape))


def output_copy(shape: Shape) -> Launch:
    """The copy the attention module would make per forward if hsda's ``(B, H, N, d)`` output were
    contiguous: ``o.transpose(1, 2).reshape(B, N, H * d)`` reads and writes the whole output. Every
    path lays the output out as ``(B, N, H, d)`` (``sdpa.token_major_empty``), so the reshape is a
    view and this launch is not issued (``vidkern.work --reference`` lists it as saved)."""
    return copy_launch("aten.clone[saved: (B, N, H, d) output layout]", 2 * _slab(shape, shape.H))
