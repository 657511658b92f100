"""The counted work model: what every kernel launch of an op costs on the GPU it is for, counted
from the launchers' own choices, without a GPU.

For one op, direction and backend (or hsda's SDPA strategy, :data:`STRATEGIES`) at one shape, :func:`model` lists every kernel launch the
launcher makes — its launch config, ``programs`` (CTAs), ``bytes`` (global loads and stores
issued, re-reads included), ``macs`` (multiply-adds issued, recompute and masked padding
included), sequential ``steps`` — and one ``"total"`` record that adds ``min_bytes`` (each input
read once, each output written once) and ``useful_macs`` (the products the math needs once).

The numbers come from formulas (one module per kernel family, beside nothing but the launcher
they mirror: ``vidkern.work.hsda`` for ``vidkern.kernels.hsda`` and so on). ``--measure`` runs the
kernels at a small shape with counters (:mod:`vidkern.work.count`: the Triton interpreter tallies
every ``tl.load``/``tl.store``/``tl.dot``; the CUDA emulator every global access) and prints the
counted figures beside the formula's; tests hold them within 2% on several shapes per kernel, so
the model cannot drift from the code.

Each record is then priced (:mod:`vidkern.work.machine`, every constant with its source) from
what the compiled code issues (:mod:`vidkern.work.compiled`: the sm_90 SASS of the configuration
the launch runs): ``dram_bytes`` (the L2 rule) and ``l2_bytes``, and the terms ``dram_us``,
``l2_us``, ``mma_us`` (at the rate of the SASS's tensor-core kind), ``mufu_us``, ``issue_us``
(with occupancy), ``latency_us`` and ``launch_us``; ``model_us`` = the largest throughput term
plus the serial ones, ``bound`` names the largest. It is a model of an H200, not a measurement;
``docs/verify.md`` has its calibration against published figures.

``python -m vidkern.work OP [key=value ...] [--json] [--measure]``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from .machine import MACHINE, TERMS, price

SMS = MACHINE.sms
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8, "i64": 8, "i32": 4}

OPS = ("hsda", "feature_summary", "team_gate", "orthogonal_select", "select_meta_tokens", "soft_merge")
DIRECTIONS = ("forward", "backward")
BACKENDS = ("triton", "cuda")
#: hsda's SDPA strategies (``vidkern.sdpa``), modelled beside the backends (``vidkern.work.sdpa``):
#: the ``backend`` key of a record names a backend or one of these
STRATEGIES = ("split", "views")
PATHS = BACKENDS + STRATEGIES


@dataclass
class Shape:
    """Shape and dtype of one op call (the CLI's ``key=value`` pairs). ``N`` is the token count of
    hsda and TEAM, ``L`` of STTM (either name is accepted for either); ``D`` is the channel width,
    ``d`` hsda's head dim; ``num_out`` STTM's output count ``L'``; ``scores``: select_meta_tokens
    with attentiveness scores (``K = ceil(1.5 L')`` candidates)."""
    B: int = 1
    H: int = 12
    N: int = 1568
    L: int = 1568
    D: int = 768
    d: int = 64
    num_out: int = 784
    grid: tuple = (8, 14, 14)
    pattern: str = "checkerboard"
    num_global_heads: Optional[int] = None
    dtype: str = "bf16"
    scores: bool = False

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def torch_dtype(self):
        import torch
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    @property
    def rate(self) -> str:
        """The tensor-core rate key of a ``tl.dot`` on inputs of this dtype."""
        return "tf32x3" if self.dtype == "fp32" else self.dtype

    @property
    def global_heads(self) -> int:
        return self.H // 2 if self.num_global_heads is None else self.num_global_heads

    def keys(self) -> dict:
        out = asdict(self)
        out["grid"] = ",".join(map(str, self.grid))
        return out


@dataclass
class Launch:
    """One kernel launch (or one torch op a launcher calls, ``kernel = "aten.<name>"``).

    ``bytes``: global bytes issued (every one an L2 request); ``unique``: the distinct bytes among
    them (compulsory DRAM traffic; None: all of them) and ``working_set``: the bytes the programs
    resident at once re-read (the L2 rule, :mod:`vidkern.work.machine`); ``round_trips``:
    dependent global round trips per sequential step; ``outer_iters``: trips one program (one warp
    of it) makes of the loop around the kernel's main loop (:func:`vidkern.work.compiled.dynamic`); ``published_us``: a library kernel's time
    at its published rate (an SDPA call) instead of terms; ``dtype``: the inputs' dtype, which
    selects the compiled configuration (:func:`vidkern.work.compiled.lookup`; :func:`records` sets
    it from the shape)."""
    kernel: str
    programs: int
    bytes: int
    macs: int = 0
    steps: int = 1
    rate: str = "bf16"                  # operand type of its products: bf16, fp16, tf32, tf32x3, fp32
    config: dict = field(default_factory=dict)
    unique: Optional[int] = None
    working_set: float = 0.0
    round_trips: int = 1
    outer_iters: int = 0                # trips a program makes of the loop around the main one (0: unknown)
    published_us: Optional[float] = None
    dtype: str = ""

    def price(self, machine=None) -> dict:
        return price(self, machine)

    @property
    def model_us(self) -> float:
        return self.price()["model_us"]


def resident_set(programs_per_problem: int, problem_bytes: float, problems: int) -> float:
    """The ``working_set`` of the L2 rule when each of ``problems`` independent problems (a head, a
    batch row) has ``programs_per_problem`` programs, launched problem after problem, re-reading
    ``problem_bytes``: the problems one SM-wide wave spans (one CTA per SM), plus one."""
    spanned = min(problems, SMS // max(1, programs_per_problem) + 1)
    return spanned * problem_bytes


F32, I64 = 4, 8   # bytes of the fp32 statistics and int64 indices the kernels read and write
GEMM_TILE = 128   # the modelled cuBLAS output tile: the programs of a GEMM a launcher leaves to torch


def gemm(batch: int, m: int, n: int, k: int, itemsize: int, out_itemsize: int, rate: str) -> Launch:
    """One ``aten.bmm`` a launcher calls: ``batch`` products of ``(m, k)`` by ``(k, n)`` operands of
    ``itemsize`` bytes into an ``(m, n)`` result of ``out_itemsize`` — each operand read once, the
    result written once (cuBLAS's re-reads of its operand tiles stay in L2 at these sizes), priced at
    the dense tensor-core rate (fp32 operands: SIMT, cuBLAS's default without TF32)."""
    nbytes = batch * ((m + n) * k * itemsize + m * n * out_itemsize)
    return Launch("aten.bmm", batch * cdiv(m, GEMM_TILE) * cdiv(n, GEMM_TILE), nbytes, batch * m * n * k,
                  rate="fp32" if rate in ("tf32", "tf32x3", "fp32") else rate,
                  config=dict(out="fp32" if out_itemsize == F32 else "inputs' dtype"), unique=nbytes)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------ registry
#: (op, backend) -> fn(direction, shape) -> [Launch]: the launches the backend makes
FORMULAS: dict = {}
#: op -> fn(direction, shape) -> (min_bytes, useful_macs)
MINIMA: dict = {}
#: (op, backend) -> fn(direction, shape) -> [Launch] counted by running the kernels (vidkern.work.count)
MEASURES: dict = {}


def formula(op: str, backend: str) -> Callable:
    def register(fn):
        FORMULAS[(op, backend)] = fn
        return fn
    return register


def minimum(op: str) -> Callable:
    def register(fn):
        MINIMA[op] = fn
        return fn
    return register


def measure(op: str, backend: str) -> Callable:
    def register(fn):
        MEASURES[(op, backend)] = fn
        return fn
    return register


def _load_formulas() -> None:
    """Import every formula module (each registers itself); a module for a kernel family that
    has not been modelled yet is simply absent."""
    import importlib
    for name in ("hsda", "sdpa", "team", "selection", "merge", "cuda"):
        try:
            importlib.import_module(f"vidkern.work.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vidkern.work.{name}":
                raise


def launches(op: str, direction: str, backend: str, shape: Shape) -> list:
    """The modelled launches of one op direction (``[]`` for a direction with no kernels, such as
    selection's backward)."""
    _load_formulas()
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    fn = FORMULAS.get((op, backend))
    if fn is None:
        raise ValueError(f"no work model of {op!r} on backend {backend!r} "
                         f"(modelled: {sorted(k for k in FORMULAS if k[0] == op)})")
    return fn(direction, shape)


def records(op: str, direction: str, backend: str, shape: Shape, counted: Optional[list] = None,
            machine=None) -> list:
    """The ``--json`` records: one per launch with its priced terms, then the ``"total"``
    (``counted``: launches to report instead of the formula's, e.g. from :data:`MEASURES`). The
    total adds the launches' bytes, MACs, steps and terms (they run in order on one stream); its
    ``bound`` is the bound of the launches that take the most modelled time together."""
    from dataclasses import replace
    rows = launches(op, direction, backend, shape) if counted is None else counted
    rows = [r if r.dtype else replace(r, dtype=shape.dtype) for r in rows]
    base = dict(op=op, direction=direction, backend=backend, **shape.keys())
    out = []
    for r in rows:
        terms = r.price(machine)
        out.append(dict(base, kernel=r.kernel, config=r.config, programs=r.programs, bytes=r.bytes, macs=r.macs,
                        steps=r.steps, **terms))
    min_bytes, useful = MINIMA[op](direction, shape) if op in MINIMA else (None, None)
    by_bound = {}
    for r in out:
        by_bound[r["bound"]] = by_bound.get(r["bound"], 0.0) + r["model_us"]
    total = dict(base, kernel="total", config={}, programs=sum(r.programs for r in rows),
                 bytes=sum(r.bytes for r in rows), macs=sum(r.macs for r in rows),
                 steps=sum(r.steps for r in rows), min_bytes=min_bytes, useful_macs=useful,
                 **{k: sum(r.get(k, 0.0) for r in out)
                    for k in TERMS + ("published_us", "dram_bytes", "l2_bytes", "model_us")},
                 bound=max(by_bound, key=by_bound.get) if by_bound else "-")
    return out + [total]


def total(op: str, direction: str, backend: str, shape: Shape) -> dict:
    return records(op, direction, backend, shape)[-1]


def ratio(a, b) -> float:
    return float("nan") if not b else a / b
