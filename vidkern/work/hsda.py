"""Work model of the HSDA Triton kernels (``vidkern.kernels.hsda``), forward and backward.

Mirrors the launchers: the launch table (``pick_config``), the tile list (one tile per
``BLOCK`` rows of each group; global heads' tiles first), the group-major ``PERM`` table read once
per gathered row (every pattern, global heads included), and per program every ``tl.load``/``tl.store`` the kernel issues: the few scalars of the tile map,
the gathered row tiles (valid rows only: masked-off lanes issue nothing) and the per-row
statistics. MACs are the ``tl.dot`` tiles issued, ``BLOCK_M x BLOCK_N x BLOCK_D`` each, padding
included: 2 per (query tile, key tile) forward, 4 in the dK/dV kernel and 3 in the dQ kernel
backward (the backward recomputes ``QK^T`` and ``dO V^T`` in both; FlashAttention-2 needs 5).

Useful MACs count the pairs actually attended: ``2 d`` per pair forward (``QK^T``, ``PV``), ``5 d``
backward (``QK^T`` recomputed once, ``dV``, ``dP``, ``dQ``, ``dK``).
"""
from __future__ import annotations

import math

from . import Launch, Shape, formula, measure, minimum, resident_set



def group_sizes(shape: Shape) -> list:
    """Sizes of the sparse heads' groups in the launcher's order (present groups, by id)."""
    t, hp, wp = shape.grid
    if shape.pattern == "checkerboard":
        hw = hp * wp
        return [s for s in (t * ((hw + 1) // 2), t * (hw // 2)) if s] if hw > 1 else [t * hw]
    import torch

    from .. import patterns
    ids = patterns.group_ids(shape.pattern, shape.grid, "cpu")
    return [int(c) for c in torch.bincount(ids) if c]


def _config(kind: str, shape: Shape):
    from ..kernels import hsda as K
    return K.pick_config(kind, shape.d, shape.torch_dtype, 90), K.block_d(shape.d)


def _tiles(sizes, block):
    """(group length, valid rows) of every tile of groups of ``sizes``."""
    return [(size, min(block, size - s)) for size in sizes for s in range(0, size, block)]


def packed_buckets(shape: Shape) -> list:
    """The launcher's packed buckets (``kernels.hsda.packs``): ``[(size, count, P)]`` when every
    sparse group holds at most ``PACKED_GROUP_MAX`` tokens, else ``[]``."""
    from ..kernels import hsda as K
    if shape.global_heads >= shape.H:
        return []
    sizes = group_sizes(shape)
    if max(sizes) > K.PACKED_GROUP_MAX[K.dtype_class(shape.torch_dtype)]:
        return []
    return [(size, sizes.count(size), K.packed_block(size)) for size in sorted(set(sizes), reverse=True)]


def _program_kinds(shape: Shape, block: int):
    """[(count, group length, valid rows, is_global)] of the tile kernel's programs of one batch row
    (no sparse ones when the sparse heads are packed)."""
    n, h, hg = shape.N, shape.H, shape.global_heads
    kinds = [(hg, n, rows, True) for _, rows in _tiles([n], block)]
    if hg < h and not packed_buckets(shape):
        kinds += [(h - hg, glen, rows, False) for glen, rows in _tiles(group_sizes(shape), block)]
    return kinds


def packed_launches(direction: str, shape: Shape) -> list:
    """One launch per packed bucket: a program per (tile of ``P // size`` whole groups, sparse head,
    batch row); per program the bucket's index entries and the valid rows of Q, K, V, O, LSE
    (forward) or Q, K, V, dO, LSE, delta, dQ, dK, dV (backward); ``P x P x BLOCK_D`` products, 2
    forward and 5 backward."""
    from ..kernels import hsda as K
    d, isz, bd = shape.d, shape.itemsize, K.block_d(shape.d)
    heads = shape.B * (shape.H - shape.global_heads)
    out = []
    for size, count, block in packed_buckets(shape):
        per = block // size
        tiles = math.ceil(count / per)
        rows = count * size                                   # valid rows of all tiles, per head
        if direction == "forward":
            nbytes, products, name = rows * (8 + 4 * d * isz + 4), 2, "_hsda_packed_fwd_kernel"
        else:
            nbytes, products, name = rows * (8 + 7 * d * isz + 8), 5, "_hsda_packed_bwd_kernel"
        out.append(Launch(name, tiles * heads, heads * nbytes, tiles * heads * products * block * block * bd,
                          rate=shape.rate, config=dict(HEAD_DIM=d, P=block, GS=size, GPT=per,
                                      num_warps=K.packed_warps(block, shape.torch_dtype))))
    return out


def _tile_map_bytes(is_global: bool) -> int:
    """``_tile``: the tile count, (group, start) for a sparse program, two group offsets."""
    return 4 + (0 if is_global else 8) + 8


def _span_bytes(block: int) -> int:
    """``_span`` over ``block`` positions loads ``GOFF[g]`` and ``block`` PERM entries (unmasked:
    positions past the group end read entry 0; a global head's too, ``tl.where`` takes both sides)."""
    return 4 + 4 * block


def forward_launch(shape: Shape) -> Launch:
    cfg, bd = _config("fwd", shape)
    bm, bn, isz, d = cfg.BLOCK_M, cfg.BLOCK_N, shape.itemsize, shape.d
    nbytes = macs = programs = 0
    for count, glen, rows, is_global in _program_kinds(shape, bm):
        if not count:
            continue
        key_tiles = math.ceil(glen / bn)
        per = _tile_map_bytes(is_global) + _span_bytes(bm) + rows * d * isz        # Q tile
        per += key_tiles * _span_bytes(bn) + 2 * glen * d * isz                    # K, V tiles
        per += rows * d * isz + rows * 4                                                 # O, LSE
        nbytes += count * per
        macs += count * key_tiles * 2 * bm * bn * bd
        programs += count
    heads = _tile_heads(shape)
    return Launch("_hsda_fwd_kernel", programs * shape.B, nbytes * shape.B, macs * shape.B, rate=shape.rate,
                  config=dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                              DEBUG=False),
                  # compulsory: Q, K, V, O and LSE of the tile kernel's heads; re-read: a head's K, V
                  unique=shape.B * heads * shape.N * (4 * d * isz + 4),
                  working_set=resident_set(programs // max(1, heads), 2 * shape.N * d * isz, shape.B * heads))


def _tile_heads(shape: Shape) -> int:
    """Heads the tile kernel runs: the global ones, and the sparse ones unless they are packed."""
    return shape.global_heads + (0 if packed_buckets(shape) else shape.H - shape.global_heads)


def forward_launches(shape: Shape) -> list:
    """The tile kernel (unless every program is packed) and the packed launches."""
    tile = forward_launch(shape)
    return ([tile] if tile.programs else []) + packed_launches("forward", shape)


def backward_launches(shape: Shape) -> list:
    cfg, bd = _config("bwd", shape)
    bm, bn, isz, d = cfg.BLOCK_M, cfg.BLOCK_N, shape.itemsize, shape.d
    b, h, n = shape.B, shape.H, shape.N
    pre = Launch("_hsda_bwd_preprocess_kernel", b * h * math.ceil(n / 64), b * h * n * (2 * d * isz + 4),
                 config=dict(HEAD_DIM=d, BLOCK_M=64))
    out = [pre]
    config = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    heads = _tile_heads(shape)
    slab = b * heads * n * d * isz
    # dK/dV: a program per key tile, looping over the group's query tiles (Q, dO, lse, delta)
    nbytes = macs = programs = 0
    for count, glen, rows, is_global in _program_kinds(shape, bn):
        q_tiles = math.ceil(glen / bm)
        per = _tile_map_bytes(is_global) + _span_bytes(bn) + 2 * rows * d * isz          # K, V
        per += q_tiles * _span_bytes(bm) + glen * (2 * d * isz + 8)                      # Q, dO, lse, delta
        per += 2 * rows * d * isz                                                              # dK, dV
        nbytes += count * per
        macs += count * q_tiles * 4 * bm * bn * bd
        programs += count
    if programs:
        # compulsory: K, V, Q, dO, lse, delta in, dK, dV out; re-read: a head's Q, dO, lse, delta
        out.append(Launch("_hsda_bwd_dkdv_kernel", programs * b, nbytes * b, macs * b, rate=shape.rate,
                          config=config, unique=6 * slab + b * heads * n * 8,
                          working_set=resident_set(programs // max(1, heads), n * (2 * d * isz + 8), b * heads)))
    # dQ: a program per query tile, looping over the group's key tiles (K, V)
    nbytes = macs = programs = 0
    for count, glen, rows, is_global in _program_kinds(shape, bm):
        k_tiles = math.ceil(glen / bn)
        per = _tile_map_bytes(is_global) + _span_bytes(bm) + rows * (2 * d * isz + 8)    # Q, dO, lse, delta
        per += k_tiles * _span_bytes(bn) + 2 * glen * d * isz                            # K, V
        per += rows * d * isz                                                                  # dQ
        nbytes += count * per
        macs += count * k_tiles * 3 * bm * bn * bd
        programs += count
    if programs:
        # compulsory: Q, dO, lse, delta, K, V in, dQ out; re-read: a head's K, V
        out.append(Launch("_hsda_bwd_dq_kernel", programs * b, nbytes * b, macs * b, rate=shape.rate, config=config,
                          unique=5 * slab + b * heads * n * 8,
                          working_set=resident_set(programs // max(1, heads), 2 * n * d * isz, b * heads)))
    return out + packed_launches("backward", shape)


@formula("hsda", "triton")
def hsda_triton(direction: str, shape: Shape) -> list:
    return forward_launches(shape) if direction == "forward" else backward_launches(shape)


def attended_pairs(shape: Shape) -> int:
    """Query-key pairs attended by one batch row, over all heads."""
    n, h, hg = shape.N, shape.H, shape.global_heads
    return hg * n * n + (h - hg) * sum(s * s for s in group_sizes(shape))


@minimum("hsda")
def hsda_minimum(direction: str, shape: Shape) -> tuple:
    """Forward: q, k, v read once, out and lse written once; backward: dO, q, k, v, out, lse read
    once, dq, dk, dv written once. Useful MACs: 2d (forward) or 5d (backward) per attended pair."""
    b, h, n, d, isz = shape.B, shape.H, shape.N, shape.d, shape.itemsize
    slab = b * h * n * d * isz
    stats = b * h * n * 4
    pairs = b * attended_pairs(shape)
    if direction == "forward":
        return 4 * slab + stats, 2 * d * pairs
    return 8 * slab + stats, 5 * d * pairs


@measure("hsda", "triton")
def hsda_measure(direction: str, shape: Shape) -> list:
    """Run the Triton launchers at ``shape`` under the interpreter's counters."""
    import torch

    from ..kernels import hsda as K
    from .count import dot_rate, triton_counts
    dtype = shape.torch_dtype
    q, k, v = (torch.randn(shape.B, shape.H, shape.N, shape.d).to(dtype) for _ in range(3))
    scale = shape.d ** -0.5
    pattern, hg = shape.pattern, shape.global_heads
    if direction == "forward":
        with triton_counts(torch_ops=False) as counted:
            K.hsda_forward(q, k, v, shape.grid, pattern, hg, scale)
    else:
        out, lse = K.hsda_forward(q, k, v, shape.grid, pattern, hg, scale)
        with triton_counts(torch_ops=False) as counted:
            K.hsda_backward(torch.randn_like(out), q, k, v, out, lse, shape.grid, pattern, hg, scale)
    return [Launch(c.kernel, c.programs, c.bytes, c.macs, rate=dot_rate(c)) for c in counted]
