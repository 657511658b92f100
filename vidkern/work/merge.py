"""Work model of the soft-merge Triton backend (``vidkern.kernels.merge``), forward and backward.

Mirrors the launchers: their path (``merge_materialises``: ``L' <= 2 D`` materialises the scores,
:func:`materialised_launches`: cuBLAS GEMMs, :func:`vidkern.work.gemm`, and two row kernels);
otherwise the streamed kernels (:func:`merge_launches`): the tiles ``(BM, BN, BK, CH)``
(``merge_blocks``), the channel groups and resident chunks (``channel_split`` with
``merge_chunks``), the warps (``merge_warps``), the batch chunks of the grid (``batch_chunks``),
and per program every ``tl.load``/``tl.store`` the kernel issues (active lanes only: padded rows
and channels issue nothing) and every ``tl.dot`` (padding
included: ``BM x BN`` score tiles, ``BK``-step contractions, ``CH``-wide chunks). ``U`` (the keys)
has ``X``'s width: ``Du = D``; ``E`` is taken to be a full ``(B, L, D)`` tensor (a stride-0
broadcast issues the same loads).

Notation: ``TM = cdiv(L, BM)`` token tiles, ``TN = cdiv(L', BN)`` meta tiles, ``G`` channel groups
(programs per tile), ``NC`` chunks per group, ``kp(K) = cdiv(K, BK) BK`` (a contraction's issued
width). A program streaming the other axis re-reads that axis' rows once per tile of its own
axis, so e.g. the token rows of ``U`` are read ``TN`` times by the meta-tile kernels.

Useful MACs (:func:`soft_merge_minimum`), in units ``U = B L L' D``: forward ``S = U V^T`` (1) +
``A = C^T X`` + ``P = C^T E`` (2) = 3U; backward ``S`` (1) + ``G = X dA^T + E dP^T`` (2) + ``dU``
(``dS V``), ``dX``, ``dE``, ``dV`` (``dS^T U``) (4) = 7U — each product the math needs, once.
Torch ops of the launchers are ``aten.<op>`` launches with their minimal traffic (``gamma``,
the final cast of ``dU``).
"""
from __future__ import annotations

from . import F32, I64, Launch, Shape, cdiv, formula, gemm, measure, minimum, resident_set





def _merge():
    from ..kernels import merge as M
    return M


def _chunks(nb: int) -> list:
    from ..kernels.launch import batch_chunks
    return [s.stop - s.start for s in batch_chunks(nb)]


def _elementwise(name: str, elements: int, in_itemsize: int, out_itemsize: int) -> Launch:
    """A torch elementwise op over ``elements`` (a scaling, a cast): one read, one write."""
    return Launch(f"aten.{name}", cdiv(elements, 1024), elements * (in_itemsize + out_itemsize), rate="fp32")


def materialised_launches(direction: str, shape: Shape) -> list:
    """The materialised path (``merge_materialises``: ``L' <= 2 D``). Forward: ``aten.gather`` (V),
    ``aten.bmm`` (S, fp32), ``_merge_rows_fwd_kernel`` (statistics), ``aten.sum`` (the column sums),
    ``_merge_rows_fwd_kernel`` (C), two ``aten.bmm`` (A, P). Backward: ``aten.sum`` (gamma),
    ``aten.gather``, three ``aten.bmm`` (S, X dA^T, E dP^T; fp32), ``_merge_rows_bwd_kernel``, two
    ``aten.bmm`` (dS V, dS^T U), ``aten.scatter_add``, two ``aten.bmm`` (dX, dE). The products of
    16-bit inputs come out in their dtype, except float16's (``half_scale``: fp32, then
    ``aten.mul`` and ``aten._to_copy`` to scale back and cast). The row kernels' bytes: the valid
    pairs' scores, gradients and outputs, the per-row and per-column statistics once per program."""
    M = _merge()
    b, L, lp, d, isz = shape.B, shape.L, shape.num_out, shape.D, shape.itemsize
    du = d
    cfg = M.merge_row_config(lp)
    tiles = cdiv(L, cfg.ROWS)
    pairs = b * L * lp
    scaled = M.half_scale(L, shape.torch_dtype) != 1.0
    gather = Launch("aten.gather", cdiv(b * lp * du, 1024), b * lp * (I64 + 2 * du * isz), rate="fp32")

    def product(batch, m, n, k):
        """``_product``: cuBLAS in the inputs' dtype, or float16's fp32 product scaled back and cast."""
        if not scaled:
            return [gemm(batch, m, n, k, isz, isz, shape.rate)]
        return [gemm(batch, m, n, k, isz, F32, shape.rate), _elementwise("mul", batch * m * n, F32, F32),
                _elementwise("_to_copy", batch * m * n, F32, isz)]

    def rows(name, nbytes, **constexprs):
        return Launch(name, tiles * b, nbytes, config=dict(cfg.launch(), **constexprs), rate="fp32")

    if direction == "forward":
        return [gather, gemm(b, L, lp, du, isz, F32, shape.rate),
                rows("_merge_rows_fwd_kernel", pairs * F32 + b * (L * F32 + tiles * lp * F32), WRITE=False),
                Launch("aten.sum", b * lp, b * (tiles + 1) * lp * F32, rate="fp32"),
                rows("_merge_rows_fwd_kernel", pairs * (F32 + isz) + b * tiles * lp * F32, WRITE=True),
                *product(b, lp, d, L), *product(b, lp, d, L)]
    out = [Launch("aten.sum", b * lp, b * (4 * lp * d * isz + lp * F32), rate="fp32",
                  config=dict(of="gamma = A.dA + P.dP per meta token")),
           gather, gemm(b, L, lp, du, isz, F32, shape.rate),
           gemm(b, L, lp, d, isz, F32, shape.rate), gemm(b, L, lp, d, isz, F32, shape.rate),
           rows("_merge_rows_bwd_kernel", pairs * (3 * F32 + 2 * isz) + b * tiles * 2 * lp * F32)]
    dsum = F32 if scaled else isz           # dS V and dS^T U: fp32 for float16, else the inputs' dtype
    out += [gemm(b, L, du, lp, isz, dsum, shape.rate), gemm(b, lp, du, L, isz, dsum, shape.rate),
            Launch("aten.scatter_add", cdiv(b * lp * du, 1024), b * lp * (I64 + 3 * du * dsum), rate="fp32")]
    if scaled:
        out += [_elementwise("mul", b * L * du, F32, F32), _elementwise("_to_copy", b * L * du, F32, isz)]
    return out + product(b, L, d, lp) + product(b, L, d, lp)


def merge_launches(direction: str, shape: Shape) -> list:
    """Forward: ``_merge_lse_kernel``, ``_merge_fwd_kernel``; backward: ``aten.sum`` (gamma),
    ``_merge_bwd_tokens_kernel``, ``_merge_bwd_dx_kernel``, ``_merge_bwd_meta_kernel``, ``aten._to_copy`` (dU to the inputs'
    dtype; none for fp32) — per batch chunk of the grid."""
    M = _merge()
    dtype = shape.torch_dtype
    L, lp, d, isz, rate = shape.L, shape.num_out, shape.D, shape.itemsize, shape.rate
    du = d
    bm, bn, bk, ch = M.merge_blocks(dtype)
    max_chunks = M.merge_chunks(dtype)
    tm, tn = cdiv(L, bm), cdiv(lp, bn)

    def kp(k):
        return cdiv(k, bk) * bk

    out = []
    if direction == "forward":
        g, nc = M.channel_split(d, ch, max_chunks)
        for b in _chunks(shape.B):
            # lse: per token tile, every meta tile: idx, U's token rows and meta rows (S); lse out
            lse_bytes = tn * L * du * isz + tm * lp * (I64 + du * isz) + L * F32
            out.append(Launch("_merge_lse_kernel", tm * b, b * lse_bytes, b * tm * tn * bm * bn * kp(du), rate=rate,
                              config=M.merge_config("lse", dtype).launch(),
                              # compulsory: U (its meta rows are U's rows), idx, lse; re-read: a batch row's U
                              unique=b * (L * du * isz + lp * I64 + L * F32), outer_iters=tn,
                              working_set=resident_set(tm, L * du * isz, b)))
            # fwd: per (meta tile, group): idx once; per token tile S (meta rows + token rows), lse,
            # the X and E chunks (groups together read each channel once per meta tile); A, P, col out
            fwd_bytes = (g * lp * I64 + g * tm * lp * du * isz + g * tn * L * (du * isz + F32)
                         + tn * L * 2 * d * isz + 2 * lp * d * isz + lp * F32)
            row = L * (du + 2 * d) * isz + L * F32
            fwd_macs = tn * g * tm * (bn * bm * kp(du) + nc * 2 * bn * bm * ch)
            out.append(Launch("_merge_fwd_kernel", tn * g * b, b * fwd_bytes, b * fwd_macs, rate=rate,
                              config=dict(M.merge_config("fwd", dtype, nc).launch(), groups=g),
                              # compulsory: U, lse, X, E, idx in; A, P, col out; re-read: a batch
                              # row's U, lse, X, E
                              unique=b * (row + lp * (I64 + 2 * d * isz + F32)), outer_iters=tm,
                              working_set=resident_set(tn * g, row, b)))
        return out
    gu, ncu = M.channel_split(du, ch, max_chunks)      # dU (token pass) and dV (meta pass)
    gx, ncx = M.channel_split(d, ch, max_chunks)       # dX, dE
    pair_k = du * isz + 2 * d * isz                    # one row of U, X, E (or of V, dA, dP) for S and G
    pair_macs = bm * bn * (kp(du) + 2 * kp(d))
    gm, ncm = gu, ncu
    pair_row = (L + lp) * (du + 2 * d) * isz           # a batch row's U, X, E and dA, dP
    dx_reread = lp * 2 * d * isz + L * du * isz
    meta_reread = L * du * isz + pair_row
    for b in _chunks(shape.B):
        out.append(Launch("aten.sum", b * lp, b * (4 * lp * d * isz + lp * F32), rate="fp32",
                          config=dict(of="gamma = A.dA + P.dP per meta token")))
        # tokens: lse once; per meta tile idx, col, gamma, S and G (token rows + meta rows), the
        # V chunks; dU (fp32) and delta out
        tok_bytes = (gu * L * F32 + gu * tm * lp * (I64 + 2 * F32) + gu * (tn * L + tm * lp) * pair_k
                     + tm * lp * du * isz + L * du * F32 + L * F32)
        tok_macs = tm * gu * tn * (pair_macs + ncu * 2 * bm * bn * ch)
        out.append(Launch("_merge_bwd_tokens_kernel", tm * gu * b, b * tok_bytes, b * tok_macs, rate=rate,
                          config=dict(M.merge_config("tokens", dtype, ncu).launch(), groups=gu),
                          # compulsory: U, X, E, dA, dP, idx, col, gamma, lse in; dU (fp32), delta
                          # out; re-read: a batch row's U, X, E, dA, dP
                          unique=b * (pair_row + lp * (I64 + 2 * F32) + L * (du * F32 + 2 * F32)),
                          working_set=resident_set(tm * gu, pair_row, b), outer_iters=tn))
        # dx: per meta tile col, lse once, idx, S (token rows + meta rows of U); the dA, dP chunks;
        # dX, dE out
        dx_bytes = (gx * L * F32 + gx * tm * lp * (I64 + F32) + gx * (tn * L + tm * lp) * du * isz
                    + tm * lp * 2 * d * isz + 2 * L * d * isz)
        dx_macs = tm * gx * tn * (bm * bn * kp(du) + ncx * 2 * bm * bn * ch)
        out.append(Launch("_merge_bwd_dx_kernel", tm * gx * b, b * dx_bytes, b * dx_macs, rate=rate,
                          config=dict(M.merge_config("dx", dtype, ncx).launch(), groups=gx),
                          # compulsory: U, lse, idx, col, dA, dP in; dX, dE out; re-read: a batch
                          # row's dA, dP and U
                          unique=b * (dx_reread + lp * (I64 + F32) + L * F32 + 2 * L * d * isz),
                          working_set=resident_set(tm * gx, dx_reread, b), outer_iters=tn))
        # meta: idx, col, gamma once; per token tile delta, lse, S and G; the U chunks; dU rows idx
        # read and written back (+ dV)
        meta_bytes = (gm * lp * (I64 + 2 * F32) + gm * tn * L * 2 * F32 + gm * (tn * L + tm * lp) * pair_k
                      + tn * L * du * isz + 2 * lp * du * F32)
        meta_macs = tn * gm * tm * (pair_macs + ncm * bn * bm * ch)
        out.append(Launch("_merge_bwd_meta_kernel", tn * gm * b, b * meta_bytes, b * meta_macs, rate=rate,
                          config=dict(M.merge_config("meta", dtype, ncm).launch(), groups=gm),
                          # compulsory: idx, delta, U, X, E, dA, dP, lse, col, gamma in; dU rows read
                          # and written; re-read: a batch row's pair rows and U
                          unique=b * (meta_reread + lp * (I64 + 2 * F32) + L * 2 * F32 + 2 * lp * du * F32),
                          working_set=resident_set(tn * gm, meta_reread, b), outer_iters=tm))
    if shape.dtype != "fp32":
        out.append(Launch("aten._to_copy", shape.B * L, shape.B * L * du * (F32 + isz), rate="fp32",
                          config=dict(of="dU fp32 -> the inputs' dtype")))
    return out


@formula("soft_merge", "triton")
def soft_merge_triton(direction: str, shape: Shape) -> list:
    """The launcher's choice (``merge_materialises``): :func:`materialised_launches` or the streamed
    :func:`merge_launches`."""
    if _merge().merge_materialises(shape.num_out, shape.D):
        return materialised_launches(direction, shape)
    return merge_launches(direction, shape)


@minimum("soft_merge")
def soft_merge_minimum(direction: str, shape: Shape) -> tuple:
    """(min_bytes, useful_macs). Forward: U, idx, X, E in; A, P, row_lse, col_sum (fp32) out.
    Backward: dA, dP, U, idx, X, E, A, P, row_lse, col_sum in; dU, dX, dE out. Useful MACs: the
    module docstring (3U forward, 7U backward, ``U = B L L' D``)."""
    b, L, lp, d, isz = shape.B, shape.L, shape.num_out, shape.D, shape.itemsize
    du = d
    tokens = b * L * (du + 2 * d) * isz            # U, X, E
    merged = b * lp * 2 * d * isz                   # A, P (or dA, dP)
    stats = b * (L + lp) * F32                      # row_lse, col_sum
    if direction == "forward":
        return tokens + b * lp * I64 + merged + stats, b * L * lp * (du + 2 * d)
    return (2 * merged + tokens + b * lp * I64 + stats + tokens,
            b * L * lp * (3 * du + 4 * d))


# ------------------------------------------------------------------ counted
def merge_inputs(shape: Shape, seed: int = 0):
    """``(u, idx, x, e)`` at ``shape``: normalised ``u``, ``L'`` distinct sorted picks per problem."""
    import torch
    g = torch.Generator().manual_seed(seed)
    dtype = shape.torch_dtype
    b, L, lp, d = shape.B, shape.L, shape.num_out, shape.D
    u = torch.nn.functional.normalize(torch.randn(b, L, d, generator=g), dim=-1).to(dtype)
    x, e = (torch.randn(b, L, d, generator=g).to(dtype) for _ in range(2))
    idx = torch.stack([torch.randperm(L, generator=g)[:lp].sort().values for _ in range(b)])
    return u, idx, x, e


def _launches(counted) -> list:
    from .count import dot_rate
    return [Launch(c.kernel, c.programs, c.bytes, c.macs, rate=dot_rate(c) if c.dots else "fp32") for c in counted]


@measure("soft_merge", "triton")
def soft_merge_measure(direction: str, shape: Shape) -> list:
    """Run the Triton launchers at ``shape`` under the interpreter's counters (their torch ops as
    ``aten.*`` estimates)."""
    import torch
    from .count import triton_counts
    M = _merge()
    u, idx, x, e = merge_inputs(shape)
    if direction == "forward":
        with triton_counts() as counted:
            M.soft_merge_forward(u, idx, x, e, 1.0)
        return _launches(counted)
    a, p, lse, col = M.soft_merge_forward(u, idx, x, e, 1.0)
    g = torch.Generator().manual_seed(1)
    da, dp = ((1e-2 * torch.randn(a.shape, generator=g)).to(a.dtype) for _ in range(2))
    with triton_counts() as counted:
        M.soft_merge_backward(da, dp, u, idx, x, e, a, p, lse, col, 1.0)
    return _launches(counted)
