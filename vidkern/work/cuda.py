"""Work formulas of the ``cuda`` backend (the CUDA C++ kernels of ``csrc/``), mirroring the
launchers' own choices in ``csrc/team.cu`` and ``csrc/sttm.cu``, and their counted twins
(``@measure``: the same kernels run in the CPU emulator with global-memory counters,
:mod:`vidkern.work.emulator`).

Conventions (as the emulator counts): ``bytes`` are the global loads and stores every thread
issues — a 16-byte pack is 16 bytes, a masked-off thread issues none, a warp-uniform scalar
(``vk::ld_warp``) counts once per warp, a value every thread of a block loads for itself counts
per thread (those re-reads hit L1 on a GPU, but they are issued). Shared memory is not counted.
``macs`` are the SIMT fp32 multiply-adds of the product loops (soft_merge's 32 x 32 tile
products, padding of a partial tile included, and its output accumulations); the TEAM kernels
and the greedy selection kernel have no product loops (``macs = 0``). Inputs are taken to be
contiguous (the launchers then move 16-byte packs; bytes do not depend on the pack width).
Torch ops the launchers call are ``aten.<op>`` launches with their minimal traffic.

The launchers size one grid from the GPU's multiprocessor count (feature_summary's token
splits); the formulas take it as ``sms`` (the model: :data:`vidkern.work.SMS`; the emulator
pretends to have 4).
"""
from __future__ import annotations

import math

from . import GEMM_TILE, SMS, Launch, Shape, cdiv, formula, measure, resident_set

THREADS = 256          # csrc: kThreads
WARPS = THREADS // 32
ROWS_PER_BLOCK = 32    # team.cu: kRowsPerBlock
TILE = 32              # sttm.cu: kTile
CHANNELS = 64          # sttm.cu: kChannels
GRAM_SCRATCH = 1 << 30  # sttm.cu: gram_chunk
ROW_LOADS = 8           # sttm.cu: kRowLoads (Gram-row entries a thread loads before folding them in)



def _pack(shape: Shape) -> int:
    """V: elements per 16-byte pack when the channel count allows, else 1 (contiguous inputs)."""
    v = 16 // shape.itemsize
    return v if shape.D % v == 0 else 1


def _column_tile(v: int) -> tuple:
    """team.cu ColumnTile<V>: (CT, RT, C)."""
    ct = 32 if v == 1 else 8
    return ct, THREADS // ct, ct * v


def _k(L: int, shape: Shape) -> int:
    """Greedy candidates of select_meta_tokens (metatokens.candidate_count, alpha = 1.5)."""
    return min(L, math.ceil(1.5 * shape.num_out)) if shape.scores else shape.num_out


# ------------------------------------------------------------------------------ TEAM
def summary_launches(direction: str, shape: Shape, sms: int = SMS) -> list:
    b, n, d, isz = shape.B, shape.N, shape.D, shape.itemsize
    v = _pack(shape)
    ct, rt, c = _column_tile(v)
    cb = cdiv(d, c)
    config = dict(V=v, block=(ct, rt))
    if direction == "forward":
        wanted = cdiv(2 * sms, cb * b)
        splits = max(1, min(wanted, n // (2 * rt)))
        splits = min(splits, n)
        rows = cdiv(n, splits)
        splits = cdiv(n, rows)
        x = b * n * d * isz
        if splits == 1:
            return [Launch("summary_fwd", cb * b, x + b * d * (isz + 12), rate="fp32", config=dict(config, splits=1))]
        partial = b * splits * 3 * d * 4
        return [Launch("summary_fwd", cb * splits * b, x + partial, rate="fp32", config=dict(config, splits=splits)),
                Launch("summary_merge", cdiv(b * d, THREADS), partial + b * d * (isz + 12), rate="fp32",
                       config=dict(splits=splits))]
    rows = 8 * rt
    rb = cdiv(n, rows)
    # every thread loads its channels' (max, sum-exp, f) and df before its rows
    stats = b * rb * rt * d * (12 + isz)
    return [Launch("summary_bwd", cb * rb * b, 2 * b * n * d * isz + stats, rate="fp32",
                   config=dict(config, rows_per_block=rows))]


def gate_launches(direction: str, shape: Shape) -> list:
    b, n, d, isz = shape.B, shape.N, shape.D, shape.itemsize
    blocks = cdiv(n, ROWS_PER_BLOCK)
    programs = blocks * b
    x = b * n * d * isz
    h = programs * d * isz            # each block stages g = sigmoid(h[b]) once
    config = dict(V=_pack(shape), rows_per_block=ROWS_PER_BLOCK, smem=d * 4)
    rows = ROWS_PER_BLOCK // WARPS           # one warp a row: the row loop around the channel loop
    if direction == "forward":
        return [Launch("gate_rows", programs, h + x + b * n * 4, rate="fp32", config=config, outer_iters=rows),  # X; s0
                Launch("token_softmax", b, 4 * b * n * 4, rate="fp32"),
                Launch("gate_apply", programs, h + b * n * 4 + 2 * x, rate="fp32", config=config, outer_iters=rows)]
    partial = b * blocks * d * 4
    return [Launch("gate_bwd_rows", programs, h + 2 * x + 4 * b * n * 4, rate="fp32", config=config,
                   outer_iters=rows),
            Launch("token_softmax_bwd", b, 5 * b * n * 4, rate="fp32"),
            Launch("gate_bwd", programs, h + b * n * 5 * 4 + 3 * x + partial, rate="fp32",
                   config=dict(config, smem=(1 + WARPS) * d * 4), outer_iters=rows),
            Launch("gate_dh", cdiv(b * d, THREADS), partial + b * d * 2 * isz, rate="fp32")]


@formula("feature_summary", "cuda")
def feature_summary_cuda(direction: str, shape: Shape) -> list:
    return summary_launches(direction, shape)


@formula("team_gate", "cuda")
def team_gate_cuda(direction: str, shape: Shape) -> list:
    return gate_launches(direction, shape)


# ------------------------------------------------------------------------------ selection
def gram_chunk(B: int, L: int) -> int:
    return max(1, min(B, GRAM_SCRATCH // (L * L * 4)))


def select_launches(shape: Shape, k: int) -> list:
    """Per chunk of problems: the Gram matrices (aten.bmm, fp32 accumulation: tensor cores for
    16-bit inputs, SIMT fp32 for fp32), then the greedy kernel, one block per problem: the
    diagonal, the start, one Gram row per step (the pick's own entry too: it is loaded with the
    others, before the compare that skips it), the K picks."""
    b, L, d, isz = shape.B, shape.L, shape.D, shape.itemsize
    chunk = gram_chunk(b, L)
    rate = "fp32" if shape.dtype == "fp32" else shape.dtype
    shared = 2 * L * 4
    out = []
    for b0 in range(0, b, chunk):
        p = min(chunk, b - b0)
        out.append(Launch("aten.bmm", p * cdiv(L, GEMM_TILE) ** 2, 2 * p * L * d * isz + p * L * L * 4,
                          p * L * L * d, rate=rate, config=dict(out="fp32"), unique=p * L * (d * isz + L * 4),
                          working_set=resident_set(cdiv(L, GEMM_TILE) ** 2, L * d * isz, p)))
        per = 4 * L + 8 * WARPS + (k - 1) * L * 4 + 8 * k
        # per step each thread scans its cdiv(L, kThreads) entries of the row, kRowLoads loads
        # issued before the first is folded in: one dependent global round trip per kRowLoads
        # entries (one entry each, before: the review's kernels-sass-read)
        out.append(Launch("select_greedy", p, p * per, steps=k, rate="fp32",
                          round_trips=cdiv(cdiv(L, THREADS), ROW_LOADS),
                          config=dict(K=k, smem=shared, chunk=p)))
    return out


@formula("orthogonal_select", "cuda")
def orthogonal_select_cuda(direction: str, shape: Shape) -> list:
    """``k = num_out`` picks from ``L`` tokens (backward: none)."""
    if direction == "backward":
        return []
    return select_launches(shape, shape.num_out)


@formula("select_meta_tokens", "cuda")
def select_meta_tokens_cuda(direction: str, shape: Shape) -> list:
    """Default start (the largest-norm token: torch ops), the greedy selection of K candidates,
    then torch's sort (without scores) or the score filter (gather, stable sort, gather, sort)."""
    if direction == "backward":
        return []
    b, L, d, isz = shape.B, shape.L, shape.D, shape.itemsize
    k, lp = _k(L, shape), shape.num_out
    out = [Launch("aten.linalg_vector_norm", b * L, b * L * (d * isz + 4), rate="fp32"),
           Launch("aten.argmax", b, b * (L * 4 + 8), rate="fp32")]
    out += select_launches(shape, k)
    if not shape.scores:
        return out + [Launch("aten.sort", b, b * k * 8 * 3, rate="fp32")]
    return out + [Launch("aten.sort", b, b * k * 8 * 3, rate="fp32"),
                  Launch("aten.gather", b, b * k * (8 + 4 + 4), rate="fp32"),
                  Launch("aten.sort", b, b * k * (4 + 4 + 8), rate="fp32"),
                  Launch("aten.gather", b, b * lp * 8 * 3, rate="fp32"),
                  Launch("aten.sort", b, b * lp * 8 * 3, rate="fp32")]


# ------------------------------------------------------------------------------ soft merge
def _tile_macs(k: int) -> int:
    """One 32 x 32 tile product over k columns, staged 32 at a time (padding included)."""
    return TILE * TILE * TILE * cdiv(k, TILE)


def _k_steps(launches: list) -> list:
    """Sets each merge launch's ``outer_iters``: its product loop (``kk``, the main loop) sits in
    a loop over 32-wide contraction chunks, one 32 x 32 x 32 tile product a trip."""
    for launch in launches:
        if launch.macs and not launch.kernel.startswith("aten."):
            launch.outer_iters = max(1, launch.macs // launch.programs // TILE ** 3)
    return launches


def merge_launches(direction: str, shape: Shape) -> list:
    b, L, lp, d, isz = shape.B, shape.L, shape.num_out, shape.D, shape.itemsize
    du = d                                   # u (the keys) has x's width
    ni, nj = cdiv(L, TILE), cdiv(lp, TILE)
    if direction == "forward":
        nc = cdiv(d, CHANNELS)
        lse = Launch("merge_lse", ni * b, b * ((L * nj + ni * lp) * du * isz + ni * lp * 8 + L * 4),
                     b * ni * nj * _tile_macs(du), rate="fp32")
        fwd_bytes = (nc * lp * 8 + nj * nc * L * 4 + nc * (lp * ni + nj * L) * du * isz + nj * L * d * isz * 2
                     + lp * d * isz * 2 + lp * 4)
        fwd = Launch("merge_fwd", nj * nc * b, b * fwd_bytes,
                     b * nj * nc * ni * (_tile_macs(du) + TILE * CHANNELS * TILE * 2), rate="fp32")
        return _k_steps([lse, fwd])
    pairs = ni * nj
    # one (token tile, meta tile) pair: the row tables' scalars and the three tile products S, G
    pair_scalars = ni * lp * 16 + nj * L * 4
    pair_tiles = (L * nj + lp * ni) * (du + 2 * d) * isz
    pair_macs = pairs * (_tile_macs(du) + 2 * _tile_macs(d))
    gamma = Launch("aten.sum", b * lp, b * (4 * lp * d * isz + lp * 4), rate="fp32",
                   config=dict(of="A.dA + P.dP per meta token"))
    delta = Launch("merge_bwd_delta", ni * b, b * (pair_scalars + pair_tiles + L * 4),
                   b * (pair_macs + pairs * TILE * TILE), rate="fp32")
    nct = cdiv(max(d, du), CHANNELS)
    tokens = Launch("merge_bwd_tokens", ni * nct * b,
                    b * (nct * (L * 4 + pair_scalars + pair_tiles) + ni * lp * (du + 2 * d) * isz
                         + L * du * 4 + 2 * L * d * isz),
                    b * nct * (pair_macs + pairs * TILE * CHANNELS * TILE * 3), rate="fp32")
    ncu = cdiv(du, CHANNELS)
    meta = Launch("merge_bwd_meta", nj * ncu * b,
                  b * (ncu * (nj * L * 4 + pair_scalars + pair_tiles) + nj * L * du * isz + lp * du * 4),
                  b * ncu * (pair_macs + pairs * TILE * CHANNELS * TILE), rate="fp32")
    dv = b * lp * du * 4
    out = [gamma, delta, tokens, meta,
           Launch("aten.index", b * lp, 2 * dv + b * lp * 8, rate="fp32"),
           Launch("aten.add", b * lp, 3 * dv, rate="fp32"),
           Launch("aten.index_put", b * lp, 2 * dv + b * lp * 8, rate="fp32")]
    if shape.dtype != "fp32":
        out.append(Launch("aten._to_copy", b * L, b * L * du * (4 + isz), rate="fp32"))
    return _k_steps(out)


@formula("soft_merge", "cuda")
def soft_merge_cuda(direction: str, shape: Shape) -> list:
    return merge_launches(direction, shape)


# ------------------------------------------------------------------------------ counted
def run_counted(op: str, direction: str, shape: Shape, seed: int = 0) -> list:
    """Runs the cuda backend's kernels of ``op`` / ``direction`` at ``shape`` in the CPU emulator
    and returns the counted launches (:class:`vidkern.work.count.Counted`), in order. Only the
    extension's kernels are counted (the launchers' torch ops are not)."""
    import torch
    from ..backends import cuda
    from .emulator import emulator_counts
    cuda.load_emulator()
    E = torch.ops.vidkern_emu
    g = torch.Generator().manual_seed(seed)
    dt = shape.torch_dtype
    if op in ("feature_summary", "team_gate"):
        x = torch.randn(shape.B, shape.N, shape.D, generator=g).to(dt)
        if op == "feature_summary":
            if direction == "forward":
                with emulator_counts() as c:
                    E.feature_summary_fwd(x)
                return c
            f, stats = E.feature_summary_fwd(x)
            with emulator_counts() as c:
                E.feature_summary_bwd(torch.randn(f.shape, generator=g).to(dt), x, stats)
            return c
        h = torch.randn(shape.B, shape.D, generator=g).to(dt)
        if direction == "forward":
            with emulator_counts() as c:
                E.team_gate_fwd(x, h)
            return c
        y, s = E.team_gate_fwd(x, h)
        with emulator_counts() as c:
            E.team_gate_bwd(torch.randn(y.shape, generator=g).to(dt), x, h, s)
        return c
    x = torch.randn(shape.B, shape.L, shape.D, generator=g).to(dt)
    if op in ("orthogonal_select", "select_meta_tokens"):
        if direction == "backward":
            return []
        k = shape.num_out if op == "orthogonal_select" else _k(shape.L, shape)
        start = torch.randint(0, shape.L, (shape.B,), generator=g)
        with emulator_counts() as c:
            E.orthogonal_select(x, k, start)
        return c
    if op == "soft_merge":
        idx = torch.sort(torch.randperm(shape.L, generator=g)[:shape.num_out]).values.expand(shape.B, -1).contiguous()
        u = x
        e = torch.randn(x.shape, generator=g).to(dt)
        tau = 0.1
        if direction == "forward":
            with emulator_counts() as c:
                E.soft_merge_fwd(u, idx, x, e, tau)
            return c
        a, p, lse, col = E.soft_merge_fwd(u, idx, x, e, tau)
        ga, gp = torch.randn(a.shape, generator=g).to(dt), torch.randn(p.shape, generator=g).to(dt)
        with emulator_counts() as c:
            E.soft_merge_bwd(ga, gp, u, idx, x, e, a, p, lse, col, tau)
        return c
    raise ValueError(f"no cuda kernels for {op!r}")


def emulated_formula(op: str, direction: str, shape: Shape) -> list:
    """The formula's launches as the emulator's launchers choose them (4 multiprocessors)."""
    from .emulator import EMULATED_SMS
    if op == "feature_summary":
        return summary_launches(direction, shape, sms=EMULATED_SMS)
    from . import FORMULAS
    return FORMULAS[(op, "cuda")](direction, shape)


def _measure(op: str):
    def run(direction: str, shape: Shape) -> list:
        """The counted kernel launches, in the formula's order with the formula's aten launches
        (not counted: modelled) and steps kept in place."""
        counted = iter(run_counted(op, direction, shape))
        out = []
        for f in emulated_formula(op, direction, shape):
            if f.kernel.startswith("aten."):
                out.append(Launch(f.kernel, f.programs, f.bytes, f.macs, f.steps, f.rate,
                                  dict(f.config, counted=False)))
                continue
            c = next(counted, None)
            if c is None:
                break
            out.append(Launch(c.kernel, c.programs, c.bytes, c.macs, f.steps if c.kernel == f.kernel else 1,
                              "fp32", dict(load_bytes=c.load_bytes, store_bytes=c.store_bytes)))
        out += [Launch(c.kernel, c.programs, c.bytes, c.macs, rate="fp32") for c in counted]
        return out
    return run


for _op in ("feature_summary", "team_gate", "orthogonal_select", "select_meta_tokens", "soft_merge"):
    measure(_op, "cuda")(_measure(_op))
