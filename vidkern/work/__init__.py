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

``model_us`` is a **model**, an H200 lower bound, not a measurement (constants below):

    f        = programs / (SMS * ceil(programs / SMS))        # share of SM slots busy, in waves
    model_us = max(bytes / (HBM_BYTES_PER_S * f), macs / (MAC_RATE[rate] * f)) + (steps - 1) * STEP_US

one program per SM per wave (a program using a fraction of the machine gets that fraction of its
bandwidth and tensor cores), and each sequential step inside a launch (a greedy pick) pays one
block-wide synchronisation ``STEP_US``. The op total adds its launches (they run in order on one
stream).

``python -m vidkern.work OP [key=value ...] [--json] [--measure]``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

# ------------------------------------------------------------------ the machine (H200 SXM), a model
SMS = 132                       # streaming multiprocessors
HBM_BYTES_PER_S = 3.7e12        # HBM3e, achievable read+write (4.8 TB/s peak; 4.3 measured for a copy)
MAC_RATE = {                    # multiply-adds per second, dense
    "bf16": 395e12,             # tensor cores: ~790 TFLOP/s measured for bf16 matmul on the lent H200
    "fp16": 395e12,
    "tf32": 197e12,             # tensor cores at half the 16-bit rate
    "tf32x3": 197e12 / 3,       # three TF32 products per float32-accurate product (vidkern.kernels.launch)
    "fp32": 33.5e12,            # FMA units (67 TFLOP/s datasheet): SIMT kernels, cuBLAS without TF32
}
STEP_US = 1.0                   # one block-wide barrier plus a dependent global round trip (~0.7 us HBM latency)
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8, "i64": 8, "i32": 4}
CONSTANTS = dict(SMS=SMS, HBM_BYTES_PER_S=HBM_BYTES_PER_S, MAC_RATE=MAC_RATE, STEP_US=STEP_US)

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
    """One kernel launch (or one torch op a launcher calls, ``kernel = "aten.<name>"``)."""
    kernel: str
    programs: int
    bytes: int
    macs: int = 0
    steps: int = 1
    rate: str = "bf16"                  # MAC_RATE key of its products
    config: dict = field(default_factory=dict)

    @property
    def model_us(self) -> float:
        return model_us(self.programs, self.bytes, self.macs, self.steps, self.rate)


F32, I64 = 4, 8   # bytes of the fp32 statistics and int64 indices the kernels read and write


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def model_us(programs: int, nbytes: float, macs: float, steps: int = 1, rate: str = "bf16") -> float:
    """The H200 lower bound of one launch (module docstring)."""
    if programs <= 0:
        return 0.0
    busy = programs / (SMS * math.ceil(programs / SMS))
    t = max(nbytes / (HBM_BYTES_PER_S * busy), macs / (MAC_RATE[rate] * busy)) * 1e6
    return t + max(steps - 1, 0) * STEP_US


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


def records(op: str, direction: str, backend: str, shape: Shape, counted: Optional[list] = None) -> list:
    """The ``--json`` records: one per launch, then the ``"total"`` (``counted``: launches to report
    instead of the formula's, e.g. from :data:`MEASURES`)."""
    rows = launches(op, direction, backend, shape) if counted is None else counted
    base = dict(op=op, direction=direction, backend=backend, **shape.keys())
    out = [dict(base, kernel=r.kernel, config=r.config, programs=r.programs, bytes=r.bytes, macs=r.macs,
                steps=r.steps, model_us=r.model_us) for r in rows]
    min_bytes, useful = MINIMA[op](direction, shape) if op in MINIMA else (None, None)
    total = dict(base, kernel="total", config={}, programs=sum(r.programs for r in rows),
                 bytes=sum(r.bytes for r in rows), macs=sum(r.macs for r in rows),
                 steps=sum(r.steps for r in rows), model_us=sum(r.model_us for r in rows),
                 min_bytes=min_bytes, useful_macs=useful)
    return out + [total]


def total(op: str, direction: str, backend: str, shape: Shape) -> dict:
    return records(op, direction, backend, shape)[-1]


def ratio(a, b) -> float:
    return float("nan") if not b else a / b
