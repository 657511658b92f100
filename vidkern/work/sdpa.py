"""Work model of hsda's SDPA strategies (``vidkern.sdpa``): ``split`` and ``views``.

The SDPA calls run cuDNN's or flash's kernels, which are not ours to count, so each call is
modelled as an *ideal FlashAttention-2-style kernel* (:func:`flash_launches`) — what a
well-tuned dense kernel must at least issue, not what cuDNN does:

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
:func:`dense_launches` is the baseline: the same ideal kernel on every head. :func:`output_copy` is the
copy that the ``(B, N, H, d)`` output layout of every path saves the attention module.
"""
from __future__ import annotations

import math

from . import SMS, Launch, Shape, cdiv, formula

FLASH_BLOCK = 128     # query and key tile rows of FA2/cuDNN's d <= 128 kernels on sm_80/sm_90


def _rate(shape: Shape) -> str:
    # fp32 SDPA on CUDA runs the memory-efficient kernel on FMA units (no TF32 by default)
    return "fp32" if shape.dtype == "fp32" else shape.dtype


def copy_launch(name: str, nbytes: int) -> Launch:
    """An elementwise copy: bandwidth-bound, with blocks enough to fill every SM."""
    return Launch(name, max(SMS, cdiv(nbytes, 1 << 16)), nbytes)


def flash_launches(direction: str, shape: Shape, seqs: int, size: int, tag: str) -> list:
    """The ideal flash kernel over ``seqs`` independent sequences of ``size`` tokens (module
    docstring); ``tag`` names the call in the kernel column."""
    if not seqs or not size:
        return []
    d, isz, bk = shape.d, shape.itemsize, FLASH_BLOCK
    tiles = math.ceil(size / bk)
    slab = seqs * size * d * isz
    products = seqs * tiles * tiles * bk * bk * d
    if direction == "forward":
        nbytes = seqs * size * d * isz * (1 + 2 * tiles) + slab + seqs * size * 4
        return [Launch(f"sdpa.flash_fwd[{tag}]", seqs * tiles, nbytes, 2 * products, rate=_rate(shape),
                       config=dict(BLOCK=bk, seqs=seqs, size=size))]
    rows = seqs * size
    pre = Launch(f"sdpa.flash_bwd_dot_do_o[{tag}]", max(1, cdiv(rows, 64)), 2 * slab + rows * 4)
    per_key_tile = rows * (2 * d * isz + 8 + 2 * 4 * d)          # Q, dO, lse, delta; dQ fp32 read+write
    main = Launch(f"sdpa.flash_bwd[{tag}]", seqs * tiles, 2 * slab + tiles * per_key_tile + 2 * slab,
                  5 * products, rate=_rate(shape), config=dict(BLOCK=bk, seqs=seqs, size=size))
    convert = copy_launch(f"sdpa.flash_bwd_convert_dq[{tag}]", rows * d * (4 + isz))
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
    """Dense attention on every head (the baseline HSDA must beat): the ideal flash kernel over
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
