"""Work model of STTM's greedy selection on the Triton backend (``vidkern.kernels.selection``):
``orthogonal_select`` and ``select_meta_tokens``, forward only (no gradient: backward has no
launches).

Mirrors the launcher (its module docstring has the design): the regime (``L <= GREEDY_MAX_L``:
Gram, else the streaming fallback), the configs (``greedy_config``, ``gram_config``,
``NORM_BLOCKS``, ``SELECT_BLOCKS``) and the chunking of the Gram scratch (``chunk_problems``
within :data:`FREE_BYTES`' share, as ``scratch_budget`` sizes it on a GPU), and
per program every ``tl.load``/``tl.store`` the kernels issue (active lanes only). Shapes: ``B``
problems of ``L`` tokens of width ``D`` in ``shape.dtype``; ``orthogonal_select`` makes
``K = num_out`` picks, ``select_meta_tokens`` ``K = min(L, ceil(1.5 L'))`` with ``scores`` and
``K = L'`` without (``L' = num_out``).

Gram regime, per launch:

* ``_inv_norm_kernel`` (once, all problems): X read once, ``1/|x|`` written, ``B L (D s + 4)``.
* ``_gram_kernel`` (per chunk of ``n`` problems): ``n T (T + 1) / 2`` programs, one per tile pair
  ``tm <= tn`` (``T = ceil(L / BLOCK)``); each loads its two row tiles across D and their inverse
  norms — every tile takes part in ``T + 1`` pairs, so ``L (T + 1) (D s + 4)`` bytes in per
  problem — and stores ``L^2`` floats (off-diagonal tiles twice, as themselves and mirrored).
  MACs as issued: ``BLOCK^2 ceil(D / BLOCK_D) BLOCK_D`` per program (padding included).
* ``_greedy_kernel`` (per chunk): ``n`` programs; per program the start (8 B) and ``K`` picks
  (``8 K``) and, at greedy step ``i = 1 .. K-1``, the entries of one Gram row still unpicked when
  it is read — the new pick's own (its ``+inf`` diagonal marks it taken) and the ``L - i`` others:
  ``4 (L - i + 1)`` bytes. ``steps = K - 1``.

Streaming fallback (``L > GREEDY_MAX_L``; also the design before the Gram regime, see
:func:`stream_launches`): one launch, ``B`` programs; per program the norm pass (X read, ``2 L``
floats of scratch written) and per step X re-read in full plus the pick's row once per token
tile, and the scores/inverse norms read and written: ``L D s + T D s + 12 L + 12`` bytes per step.

``select_meta_tokens`` adds the torch ops ``vidkern.ops`` makes around the selection: the eval
start (``metatokens.default_start``: a norm over D and an argmax; a training start is drawn by
the caller), then ``torch.sort`` of the picks, or with scores ``metatokens.filter_by_scores``
(sort, gather the candidates' scores, stable sort by score, gather, sort). They are modelled
``aten.`` launches, minimal traffic, one program per batch row (torch sorts a short row in one
block) or per output row of the norm.

Minima (:func:`_minimum`): ``min_bytes`` = X read once, start (``orthogonal_select``) / scores
(``select_meta_tokens`` with scores) read once, the int64 picks written once. ``useful_macs``: the
``|cos|`` products the greedy rule cannot do without — each pick against every token still
unpicked after it, ``D ((K-1)(L-1) - (K-1)(K-2)/2)`` per problem. Not the Gram's ``L^2 D``: with
``K < L`` most of the Gram is never read, and of a symmetric matrix only half is distinct; the
kernel computes the upper triangle of tiles (``(T+1)/(2T)`` of ``L^2 D``, padding included), so
``macs / useful_macs`` measures what the Gram formulation costs over the minimal rule (1.3-2x
at the reference shapes).
"""
from __future__ import annotations

import functools

import math

from . import F32, I64, Launch, Shape, cdiv, formula, measure, minimum, resident_set





#: the device memory the model takes as free when the launcher sizes its Gram scratch
#: (``kernels.selection.scratch_budget``): half an 80 GB H100, the smaller of the two GPUs priced
#: (weights, activations and optimizer state hold the rest); ``SCRATCH_BUDGET`` overrides the budget
#: (the counting tests set the CPU launcher's ``GRAM_SCRATCH_BYTES``)
FREE_BYTES = 40 * 10 ** 9
SCRATCH_BUDGET = None


def _sel():
    from ..kernels import selection as S
    return S


def candidates(op: str, shape: Shape) -> int:
    """``K``, the greedy picks the launcher makes (``vidkern.metatokens.candidate_count``)."""
    if op == "orthogonal_select" or not shape.scores:
        return shape.num_out
    return min(shape.L, math.ceil(1.5 * shape.num_out))


# ------------------------------------------------------------------ the kernels
def greedy_bytes(length: int, k: int) -> int:
    """Bytes one ``_greedy_kernel`` program issues: start, ``k`` picks, ``sum_{i<k} 4 (L - i + 1)``."""
    return I64 + I64 * k + F32 * ((k - 1) * length - (k - 1) * (k - 2) // 2)


def stream_launches(shape: Shape, k: int) -> list:
    """``_stream_select_kernel``: the fallback for ``L > GREEDY_MAX_L`` — and, at any ``L``, the
    single-launch design the Gram regime replaced (review item P1)."""
    S = _sel()
    b, n, d, s = shape.B, shape.L, shape.D, shape.itemsize
    cfg = S.SELECT_BLOCKS
    tiles = cdiv(n, cfg.BLOCK_L)
    norm = n * d * s + 2 * n * F32                          # X in; score = 0 and 1/|x| out
    step = F32 + tiles * d * s + n * d * s + 3 * n * F32 + I64   # 1/|x_cur|; x_cur per tile; X; inv, score in, score out; pick
    per = norm + 2 * I64 + (k - 1) * step                   # + start in, first pick out
    # compulsory: X once, the picks; re-read every step: the problem's X (one program a problem)
    return [Launch("_stream_select_kernel", b, b * per, steps=max(1, k - 1), rate="fp32",
                   config=cfg.launch(), unique=b * (n * d * s + 2 * n * F32 + k * I64 + I64),
                   working_set=resident_set(1, n * d * s + 2 * n * F32, b))]


def select_launches(shape: Shape, k: int) -> list:
    """The launches of ``kernels.selection.orthogonal_select(x (B, L, D), k, start)``."""
    S = _sel()
    b, n, d, s = shape.B, shape.L, shape.D, shape.itemsize
    if b == 0:
        return []
    if n > S.GREEDY_MAX_L:
        return stream_launches(shape, k)
    greedy_cfg = S.greedy_config(n).launch()
    if k == 1:
        return [Launch("_greedy_kernel", b, b * greedy_bytes(n, 1), rate="fp32", config=greedy_cfg)]
    norm = S.NORM_BLOCKS
    out = [Launch("_inv_norm_kernel", b * cdiv(n, norm.BLOCK_L), b * n * (d * s + F32), rate="fp32",
                  config=norm.launch())]
    gram = S.gram_config(shape.torch_dtype)
    block, block_d = gram.BLOCK, gram.BLOCK_D
    tiles = cdiv(n, block)
    pairs = tiles * (tiles + 1) // 2
    gram_cfg = dict(gram.launch(), pairs=pairs)
    per = S.chunk_problems(n, SCRATCH_BUDGET if SCRATCH_BUDGET is not None else int(S.GRAM_FREE_SHARE * FREE_BYTES))
    for start in range(0, b, per):
        m = min(b, start + per) - start
        gram_bytes = m * (n * (tiles + 1) * (d * s + F32) + n * n * F32)
        macs = m * pairs * block * block * cdiv(d, block_d) * block_d
        # compulsory: X and 1/|x| once, the Gram written; re-read: a problem's X
        out.append(Launch("_gram_kernel", m * pairs, gram_bytes, macs, rate=shape.rate, config=gram_cfg,
                          unique=m * (n * (d * s + F32) + n * n * F32),
                          working_set=resident_set(pairs, n * (d * s + F32), m)))
        out.append(Launch("_greedy_kernel", m, m * greedy_bytes(n, k), steps=max(1, k - 1), rate="fp32",
                          config=greedy_cfg))
    return out


def torch_launches(shape: Shape, k: int) -> list:
    """The torch ops ``vidkern.ops.select_meta_tokens`` makes around the selection (eval start)."""
    b, n, d, s, lp = shape.B, shape.L, shape.D, shape.itemsize, shape.num_out
    start = [Launch("aten.linalg_vector_norm", b * n, b * n * d * s + b * n * s, rate="fp32"),
             Launch("aten.argmax", b, b * n * s + b * I64, rate="fp32")]
    sort_k = Launch("aten.sort", b, 3 * b * k * I64, rate="fp32")          # values in; values, indices out
    if not shape.scores:
        return start, [sort_k]
    return start, [sort_k,
                   Launch("aten.gather", b, b * k * (I64 + 2 * s), rate="fp32"),         # cand; scores in, out
                   Launch("aten.sort", b, b * k * (2 * s + I64), rate="fp32"),           # by score (stable)
                   Launch("aten.gather", b, 3 * b * lp * I64, rate="fp32"),              # order, cand in; out
                   Launch("aten.sort", b, 3 * b * lp * I64, rate="fp32")]


@formula("orthogonal_select", "triton")
def orthogonal_select_triton(direction: str, shape: Shape) -> list:
    return select_launches(shape, candidates("orthogonal_select", shape)) if direction == "forward" else []


@formula("select_meta_tokens", "triton")
def select_meta_tokens_triton(direction: str, shape: Shape) -> list:
    if direction != "forward":
        return []
    k = candidates("select_meta_tokens", shape)
    before, after = torch_launches(shape, k)
    return before + select_launches(shape, k) + after


# ------------------------------------------------------------------ minima
def _minimum(op: str, direction: str, shape: Shape) -> tuple:
    """(min_bytes, useful_macs), see the module docstring."""
    if direction != "forward":
        return 0, 0
    b, n, d, s = shape.B, shape.L, shape.D, shape.itemsize
    k = candidates(op, shape)
    x = b * n * d * s
    if op == "orthogonal_select":
        io = b * I64 + b * k * I64                           # start in, picks out
    else:
        io = (b * n * s if shape.scores else 0) + b * shape.num_out * I64
    useful = b * d * ((k - 1) * (n - 1) - (k - 1) * (k - 2) // 2)
    return x + io, useful

for _op in ("orthogonal_select", "select_meta_tokens"):   # both ops' minima: one rule
    minimum(_op)(functools.partial(_minimum, _op))





def step_bytes(launch: Launch, length: int) -> float:
    """The most bytes one program of a greedy launch reads or writes in one greedy step."""
    if launch.kernel == "_greedy_kernel":
        return F32 * length + I64                            # step 1: all L entries (the start's own too), one pick
    raise ValueError(launch.kernel)


# ------------------------------------------------------------------ counted
def _inputs(shape: Shape, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.B, shape.L, shape.D, generator=g).to(shape.torch_dtype)
    start = torch.randint(0, shape.L, (shape.B,), generator=g)
    scores = torch.rand(shape.B, shape.L, generator=g).to(x.dtype)
    return x, start, scores


def _launches(counted) -> list:
    """Counted launches as :class:`Launch` records. The interpreter has no notion of a step; the
    greedy steps are counted from what each step stores: ``_greedy_kernel`` stores only its picks
    (``K`` int64 per program, the start and one per step), ``_stream_select_kernel`` calls
    ``tl.debug_barrier`` once after the norm pass and once per step."""
    from .count import dot_rate
    out = []
    for c in counted:
        steps = 1
        if c.kernel == "_greedy_kernel" and c.programs:
            steps = max(1, c.store_bytes // (I64 * c.programs) - 1)
        elif c.kernel == "_stream_select_kernel" and c.programs:
            steps = max(1, c.barriers // c.programs - 1)
        rate = dot_rate(c) if c.dots else "fp32"
        out.append(Launch(c.kernel, c.programs, c.bytes, c.macs, steps=steps, rate=rate))
    return out


@measure("orthogonal_select", "triton")
def orthogonal_select_measure(direction: str, shape: Shape) -> list:
    """Run ``kernels.selection.orthogonal_select`` at ``shape`` under the interpreter's counters
    (bf16: the interpreter's Gram upcasts to float32, the same bytes and MACs)."""
    if direction != "forward":
        return []
    from .count import triton_counts
    x, start, _ = _inputs(shape)
    with triton_counts() as counted:
        _sel().orthogonal_select(x, candidates("orthogonal_select", shape), start)
    return _launches(counted)


@measure("select_meta_tokens", "triton")
def select_meta_tokens_measure(direction: str, shape: Shape) -> list:
    """Run ``vidkern.select_meta_tokens(backend="triton")`` at ``shape`` under the counters: the
    Triton kernels, and the torch ops around them (``vidkern.checks`` included) as ``aten.``."""
    if direction != "forward":
        return []
    from .. import ops
    from .count import triton_counts
    x, _, scores = _inputs(shape)
    with triton_counts() as counted:
        ops.select_meta_tokens(x, shape.num_out, scores if shape.scores else None, backend="triton")
    return _launches(counted)
