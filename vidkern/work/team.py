"""Work model of the TEAM Triton kernels (``vidkern.kernels.team``): ``feature_summary`` and
``team_gate``, forward and backward.

Mirrors the launchers: the configs (``summary_config``, ``rows_config``), the token split of the
column kernels (``summary_splits``) and the rows per program of the row kernels (``gate_rows``),
and per program every ``tl.load``/``tl.store`` the kernel issues (active lanes only: the padded
channels of a row tile, ``D`` to ``BLOCK_D``, issue nothing). The launchers call no torch op
between their kernels (the per-batch steps — the token softmax, ``ds0``, the ``dh`` reduction —
are folded into the kernels), so every launch listed is a Triton kernel.

MACs: none. These kernels are elementwise and row/column reductions on the FMA units, no
``tl.dot``; the model's ``macs`` counts ``tl.dot`` products, so ``macs = useful_macs = 0`` and
their time is their bytes. ``X`` below is one ``B*N*D`` tensor in the input dtype.

Passes (:func:`pass_bytes`): what the algorithm must move, beyond which no design can go —
``feature_summary`` forward reads X once, backward reads X once and writes dX; ``team_gate``
forward reads X twice (the token softmax needs every token's ``s0`` before any ``Y``) and writes
Y, backward reads X and dY twice (``ds0`` needs every token's ``ds = dY . X'`` before any dX) and
writes dX; plus each op's small inputs and outputs once (:func:`_minimum`).
"""
from __future__ import annotations

import functools

from . import F32, Launch, Shape, cdiv, formula, measure, minimum





def _team():
    from ..kernels import team as T
    return T


# ------------------------------------------------------------------ feature_summary
def summary_launches(direction: str, shape: Shape) -> list:
    """``_summary_fwd_kernel`` then ``_summary_merge_kernel`` forward, ``_summary_bwd_kernel``
    backward."""
    T = _team()
    b, n, d, isz = shape.B, shape.N, shape.D, shape.itemsize
    cfg = T.summary_config(d, direction == "forward")
    splits, rows = T.summary_splits(b, n, d, direction == "forward")
    programs = cdiv(d, cfg.BLOCK_D) * splits * b
    config = dict(cfg.launch(), splits=splits, rows=rows)
    x = b * n * d * isz
    if direction == "forward":
        # X once; per (split, channel) the state (max, sum-exp, mean) out, merged in split order
        small = T.SMALL_CONFIG
        merge = b * splits * 4 * d * F32 + b * d * isz + b * 3 * d * F32   # states in (maxima twice); f, stats out
        return [Launch("_summary_fwd_kernel", programs, x + b * splits * 3 * d * F32, rate="fp32", config=config),
                Launch("_summary_merge_kernel", cdiv(d, small.BLOCK_D) * b, merge, rate="fp32",
                       config=dict(small.launch(), splits=splits))]
    # per program its channels' stats (3 fp32) and df; X read and dX written once
    per_split = b * d * (3 * F32 + isz)
    return [Launch("_summary_bwd_kernel", programs, 2 * x + splits * per_split, rate="fp32", config=config)]


@formula("feature_summary", "triton")
def feature_summary_triton(direction: str, shape: Shape) -> list:
    return summary_launches(direction, shape)


# ------------------------------------------------------------------ team_gate
def gate_launches(direction: str, shape: Shape) -> list:
    """Forward: ``_gate_rows_kernel``, ``_gate_apply_kernel``; backward: ``_gate_bwd_rows_kernel``,
    ``_gate_bwd_kernel``, ``_gate_dh_kernel``. Every row program loads h once (D elements) and, in
    the second pass, all of its batch row's per-program partials (``blocks`` of them)."""
    T = _team()
    b, n, d, isz = shape.B, shape.N, shape.D, shape.itemsize
    rows = T.gate_rows(b, n, d)
    blocks = cdiv(n, rows)
    programs = blocks * b
    config = dict(T.rows_config(d).launch(), rows=rows)
    x = b * n * d * isz
    tok = b * n * F32                 # one fp32 per token
    gate = programs * d * isz         # h, once per program
    if direction == "forward":
        rows_k = gate + x + tok + programs * 2 * F32                            # X; s0; (max, sum-exp)
        apply_k = gate + programs * blocks * 2 * F32 + x + 2 * tok + x           # parts; X; s0 in, s out; Y
        return [Launch("_gate_rows_kernel", programs, rows_k, rate="fp32", config=config),
                Launch("_gate_apply_kernel", programs, apply_k, rate="fp32", config=config)]
    small = T.SMALL_CONFIG
    rows_k = gate + 2 * x + 2 * tok + programs * F32                            # X, dY; ds out, s in; sum s ds
    bwd_k = gate + programs * blocks * F32 + 2 * x + 2 * tok + x + programs * d * F32  # parts; X, dY; s, ds; dX; DG
    dh_k = b * blocks * d * F32 + 2 * b * d * isz                               # DG; h in, dh out
    return [Launch("_gate_bwd_rows_kernel", programs, rows_k, rate="fp32", config=config),
            Launch("_gate_bwd_kernel", programs, bwd_k, rate="fp32", config=config),
            Launch("_gate_dh_kernel", cdiv(d, small.BLOCK_D) * b, dh_k, rate="fp32",
                   config=dict(small.launch(), blocks=blocks))]


@formula("team_gate", "triton")
def team_gate_triton(direction: str, shape: Shape) -> list:
    return gate_launches(direction, shape)


# ------------------------------------------------------------------ minima
def _minimum(op: str, direction: str, shape: Shape) -> tuple:
    """(min_bytes, useful_macs): each input read once, each output written once, saved tensors
    included. ``useful_macs`` is 0 (no matrix products; see the module docstring).

    feature_summary forward: X in; f (X's dtype), stats (B, 3, D) fp32 out. Backward: df, X, stats
    in (f is handed over too but is ``stats[:, 2]``); dX out. team_gate forward: X, h in; Y and s
    ((B, N) fp32) out. Backward: dY, X, h, s in; dX, dh out."""
    b, n, d, isz = shape.B, shape.N, shape.D, shape.itemsize
    x, bd, tok = b * n * d * isz, b * d * isz, b * n * F32
    if op == "feature_summary":
        stats = b * 3 * d * F32
        return (x + bd + stats if direction == "forward" else bd + x + stats + x), 0
    if direction == "forward":
        return x + bd + x + tok, 0
    return x + x + bd + tok + x + bd, 0

for _op in ("feature_summary", "team_gate"):   # both ops' minima: one rule
    minimum(_op)(functools.partial(_minimum, _op))





def pass_bytes(op: str, direction: str, shape: Shape) -> int:
    """The bytes of the passes the algorithm needs (the TEAM targets: ``bytes <= 1.25 x`` this):
    ``min_bytes`` (:func:`_minimum`) plus the re-reads no single-pass design avoids — team_gate forward reads X a
    second time (Y needs the token softmax, which needs every token's s0, which needs a whole
    pass); its backward reads X and dY a second time (dX needs ds0, which needs every token's
    ds = dY . X'). feature_summary needs one pass each way (the backward's P comes from the
    saved per-channel max and sum-exp), so its figure is ``min_bytes``."""
    base = _minimum(op, direction, shape)[0]
    if op == "feature_summary":
        return base
    x = shape.B * shape.N * shape.D * shape.itemsize
    return base + (x if direction == "forward" else 2 * x)


# ------------------------------------------------------------------ counted
def _inputs(shape: Shape, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    dtype = shape.torch_dtype
    x = (torch.randn(shape.B, shape.N, shape.D, generator=g) * 2).to(dtype)
    h = torch.randn(shape.B, shape.D, generator=g).to(dtype)
    return x, h, torch.randn(shape.B, shape.N, shape.D, generator=g).to(dtype)


def _launches(counted) -> list:
    from .count import dot_rate
    return [Launch(c.kernel, c.programs, c.bytes, c.macs, rate=dot_rate(c) if c.dots else "fp32") for c in counted]


@measure("feature_summary", "triton")
def feature_summary_measure(direction: str, shape: Shape) -> list:
    """Run the Triton launchers at ``shape`` under the interpreter's counters (torch ops too: there
    should be none between the kernels)."""
    from .count import triton_counts
    T = _team()
    x, _, _ = _inputs(shape)
    if direction == "forward":
        with triton_counts() as counted:
            T.feature_summary_forward(x)
    else:
        f, stats = T.feature_summary_forward(x)
        df = _inputs(shape, 1)[1]
        with triton_counts() as counted:
            T.feature_summary_backward(df, x, f, stats)
    return _launches(counted)


@measure("team_gate", "triton")
def team_gate_measure(direction: str, shape: Shape) -> list:
    """Run the Triton launchers at ``shape`` under the interpreter's counters."""
    from .count import triton_counts
    T = _team()
    x, h, dy = _inputs(shape)
    if direction == "forward":
        with triton_counts() as counted:
            T.team_gate_forward(x, h)
    else:
        _, s = T.team_gate_forward(x, h)
        with triton_counts() as counted:
            T.team_gate_backward(dy, x, h, s)
    return _launches(counted)
