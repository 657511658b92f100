"""Backend selection: the one place that decides which implementation runs an op.

Each backend *declares* the ops, devices and dtypes it supports and answers
``not_supported_reasons(inputs)`` for one :class:`Inputs`: the op, the tensors' device and dtype,
the shape facts backends declare limits on, and whether the backend was asked for by name.
``backend=`` (or the ``VIDKERN_BACKEND`` environment variable) forces one and raises with its
reasons if it cannot run; otherwise the backends are tried in :func:`order` — registration
priority, rearranged per op by :data:`PREFERENCES` — and the first without reasons runs.
``python -m vidkern.info`` prints these rules.

A backend's op methods are the interface :func:`vidkern.library.interface` derives from the
op's declaration; :func:`register` refuses a backend whose methods do not match it.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import library
from .kernels import limits

ENV_VAR = "VIDKERN_BACKEND"


#: op -> (backends tried first, in this order, ahead of their registration priority; why)
#: Each is what the work model prices faster at every reference shape (``python -m vidkern.work
#: --reference``; tests/test_work_model.py holds the model to every preference here).
PREFERENCES = {
    "soft_merge": (("triton", "cuda"), "Triton's merge runs its products on tensor cores (cuBLAS GEMMs while "
                                       "L' <= 2 D); the CUDA kernels are SIMT fp32 (a correct, portable baseline)"),
    "feature_summary": (("triton", "cuda"), "Triton's column kernel walks a thread's channels with no "
                                            "cross-thread reduction: 73 us against 113 forward plus backward at "
                                            "ViT-B B=32"),
    "team_gate": (("triton", "cuda"), "Triton's gate kernels issue fewer instructions a token than the CUDA "
                                      "ones: 201 us against 274 forward plus backward at ViT-B B=32"),
    "orthogonal_select": (("triton", "cuda"), "Triton's greedy step is cheaper per pick (its Gram rows "
                                              "are read by 4-32 warps with one load round trip a step; "
                                              "the CUDA block loads 8 entries a thread at a time: 7 "
                                              "round trips a step at long clips): 10 ms against 26 ms on "
                                              "the long clip, 0.37 against 0.47 ms for 784 -> 588 at B=32"),
}

#: The reference path — autograd through the materialised math, its intermediates saved — is faster
#: on a CPU than the torch backend's custom ops, which recompute the forward in the backward to keep
#: memory at the inputs' size, wherever those intermediates are small (benchmarks/test_team_sttm.py;
#: docs in README "Backends"): TEAM's are (B, N, D) tensors; soft merge's are (B, L, L') score
#: matrices, small while L' <= 2 D (``kernels.limits.merge_materialises``, the rule the Triton
#: backend's materialised path follows on a GPU; measured 1.2-1.4x faster at L'/D = 0.26-1.5 on 2
#: cores); wider merges (the long clip, L'/D = 8) stream in the torch backend, where memory matters
#: and streaming is faster too.
def _cpu_materialise(inputs: "Inputs") -> bool:
    if inputs.device.type != "cpu":
        return False
    if inputs.op != "soft_merge":
        return True
    return (inputs.meta_tokens is not None and inputs.token_width is not None
            and limits.merge_materialises(inputs.meta_tokens, inputs.token_width))


#: op -> (applies(inputs), backends tried first when it does, why): preferences on the call's device
#: and shape facts, over :data:`PREFERENCES`
RULES = {
    "feature_summary": (_cpu_materialise, ("reference", "torch"), "on CPU the reference (autograd, intermediates "
                                                                  "saved) is faster than recomputing"),
    "team_gate": (_cpu_materialise, ("reference", "torch"), "on CPU the reference (autograd, intermediates saved) "
                                                            "is faster than recomputing"),
    "soft_merge": (_cpu_materialise, ("reference", "torch"), "on CPU with L' <= 2 D the reference (materialised "
                                                             "(L, L') scores, autograd) is faster than streaming"),
}

#: Methods of an op without a custom op (a plain function of the backend): name -> parameters.
PLAIN_INTERFACES = {"group_mean": {"group_mean": ["x", "grid", "pattern", "num_groups"]}}

#: Every op a backend may declare: the fused ops of :data:`vidkern.library.SPECS`, then the plain ones.
OPS = tuple(library.SPECS) + tuple(PLAIN_INTERFACES)


def availability_check(fn):
    """``fn()`` (why a backend cannot run: an import or a library load, or None) called once and
    its answer kept; ``.cache_clear()`` forgets it. Dispatch runs while ``torch.compile`` traces:
    the kept answer is a plain global read there (``functools.lru_cache`` made dynamo warn and
    trace through the cache), and a first call while tracing runs ``fn`` eagerly and keeps the
    result as a constant (``assume_constant_result``): tracing an import would break the graph."""
    constant = torch.compiler.assume_constant_result(fn)
    kept = {}

    def check():
        if "answer" not in kept:
            kept["answer"] = constant()
        return kept["answer"]

    check.cache_clear = kept.clear
    check.__doc__, check.__name__, check.__wrapped__ = fn.__doc__, fn.__name__, fn
    return check


@dataclass(frozen=True)
class Inputs:
    """What dispatch knows of one call: ``op``, its tensors' ``device`` and ``dtype`` (``None``:
    any), the shape facts backends declare limits on (``head_dim`` for attention, ``channels`` for
    TEAM) or :data:`RULES` read (``meta_tokens``, ``token_width`` for soft merge), and ``forced``:
    the caller asked for the backend by name."""

    op: str
    device: torch.device
    dtype: Optional[torch.dtype] = None
    head_dim: Optional[int] = None
    channels: Optional[int] = None
    forced: bool = False
    meta_tokens: Optional[int] = None   # soft merge: L' (the scores are (L, L'))
    token_width: Optional[int] = None   # soft merge: D of the merged tokens

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")


class Backend:
    """Base class. Subclasses set the class attributes and implement the op methods.

    ``native_autograd = True`` (the reference backend only) means the ops are the functions of
    :mod:`vidkern.reference`, differentiated by PyTorch autograd; otherwise the op runs as a
    ``torch.library`` custom op whose forward and backward call the backend's methods named by
    :func:`vidkern.library.interface` (``<op>_forward`` / ``<op>_backward``, or ``<op>`` for an op
    without a backward), with the keyword arguments listed there.
    """

    name: str = ""
    ops: frozenset = frozenset()
    devices: frozenset = frozenset({"cpu", "cuda"})
    dtypes: dict = {}  # device type -> frozenset of dtypes
    native_autograd: bool = False
    max_head_dim: Optional[int] = None  # attention: largest head dim the kernels take (None: any)
    max_channels: Optional[int] = None  # TEAM: largest D (a whole row of channels per token)

    def unavailable_reason(self) -> Optional[str]:
        """Why the backend cannot run at all on this machine (missing package, no GPU), or None."""
        return None

    def not_supported_reasons(self, inputs: Inputs) -> list:
        """Every reason this backend cannot run ``inputs.op`` on these inputs (empty: it can)."""
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if inputs.op not in self.ops:
            reasons.append(f"does not implement {inputs.op}")
        device, dtype = inputs.device, inputs.dtype
        if device.type not in self.devices:
            reasons.append(f"device {device.type} not in {sorted(self.devices)}")
        elif dtype is not None and dtype not in self.dtypes.get(device.type, ()):
            reasons.append(f"dtype {dtype} not supported on {device.type}")
        if inputs.head_dim is not None and self.max_head_dim is not None and inputs.head_dim > self.max_head_dim:
            reasons.append(f"head dim {inputs.head_dim} > {self.max_head_dim}")
        if inputs.channels is not None and self.max_channels is not None and inputs.channels > self.max_channels:
            reasons.append(f"{inputs.channels} channels > {self.max_channels}")
        return reasons

    def reasons(self, op: str, device, dtype=None, **facts) -> list:
        """``not_supported_reasons(Inputs(op, device, dtype, **facts))``, spelled out."""
        return self.not_supported_reasons(Inputs(op, torch.device(device), dtype, **facts))


_BACKENDS: dict = {}
_PRIORITY: list = []


def interface(op: str) -> dict:
    """``{method: [parameter names]}`` a backend implementing ``op`` must have."""
    if op in PLAIN_INTERFACES:
        return PLAIN_INTERFACES[op]
    return library.interface(library.SPECS[op])


def interface_errors(backend: Backend) -> list:
    """How ``backend``'s methods differ from the interface of the ops it declares (empty: none)."""
    errors = []
    for op in sorted(backend.ops):
        if backend.native_autograd and op not in PLAIN_INTERFACES:
            continue   # the reference's own functions, differentiated by autograd
        for method, params in interface(op).items():
            fn = getattr(backend, method, None)
            if not callable(fn):
                errors.append(f"{op}: no method {method}({', '.join(params)})")
                continue
            got = [p.name for p in inspect.signature(fn).parameters.values()
                   if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if got != params:
                errors.append(f"{op}: {method}({', '.join(got)}) must take ({', '.join(params)})")
    return errors


def register(backend: Backend, priority: int) -> None:
    """Register ``backend``; lower ``priority`` numbers are tried first. Its methods are checked
    against the interface of every op it declares (a ``TypeError`` lists the differences)."""
    errors = interface_errors(backend)
    if errors:
        raise TypeError(f"backend {backend.name!r} does not implement the op interface "
                        "(vidkern.library.interface): " + "; ".join(errors))
    _BACKENDS[backend.name] = backend
    _PRIORITY.append((priority, backend.name))
    _PRIORITY.sort()


def get(name: str, source: str = "backend") -> Backend:
    """The backend called ``name``; ``source`` names where the name came from in the error."""
    if name not in _BACKENDS:
        raise ValueError(f"{source} must be one of {names()}, got {name!r}")
    return _BACKENDS[name]


def validate_name(name: Optional[str], source: str = "backend") -> Optional[str]:
    """``name`` if it is a registered backend or None (automatic); else a ValueError naming ``source``.
    Modules call this at construction, so a typo fails there and not at the first forward."""
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(f"{source} must be None or one of {names()}, got {type(name).__name__}")
        get(name, source)
    return name


def names() -> list:
    """Registered backends in priority order."""
    return [name for _, name in _PRIORITY]


def order(op: str, inputs: Optional[Inputs] = None) -> list:
    """The backends automatic dispatch tries for ``op``: :func:`names`, with the preferred ones of
    :data:`PREFERENCES` moved, in their order, into the places those backends hold; then, for
    ``inputs`` a rule of :data:`RULES` applies to, its preferred ones moved the same way."""
    def prefer(default, wanted):
        preferred = [n for n in wanted if n in default]
        slots = iter(preferred)
        return [next(slots) if n in preferred else n for n in default]
    out = prefer(names(), PREFERENCES.get(op, ((), ""))[0])
    if inputs is not None and op in RULES and RULES[op][0](inputs):
        out = prefer(out, RULES[op][1])
    return out


def requested_backend(backend: Optional[str] = None, op: Optional[str] = None) -> Optional[str]:
    """The backend asked for: ``backend``, else ``$VIDKERN_BACKEND``, else None (automatic). With
    ``op``: None also when the asked-for backend does not implement ``op`` — forcing a backend
    means "run its kernels where it has them"; an op it lacks (triton has no ``group_mean``, cuda
    no ``hsda``) runs on automatic dispatch, so a forced backend still runs whole models
    (``python -m vidkern.info`` lists these fallbacks). A backend that has the op but cannot run
    these inputs is still an error (:func:`select`)."""
    requested = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if requested is not None and op is not None and op not in get(requested, _source(backend)).ops:
        return None
    return requested


def _source(backend: Optional[str]) -> str:
    return "backend" if backend is not None else f"${ENV_VAR}"


def fallbacks(name: str) -> list:
    """The ops backend ``name`` does not implement: forced, it leaves them to automatic dispatch."""
    return [op for op in OPS if op not in get(name).ops]


def select(inputs: Inputs, backend: Optional[str] = None) -> Backend:
    """Pick the backend for ``inputs``.

    ``backend`` (else ``$VIDKERN_BACKEND``) forces a choice for the ops it implements: it must run
    them or this raises ``NotImplementedError`` with its reasons (ops it lacks fall back to
    automatic dispatch: :func:`requested_backend`). Otherwise the first backend of :func:`order`
    without reasons runs.
    """
    requested = requested_backend(backend, inputs.op)
    op, where = inputs.op, f"{inputs.device.type}/{inputs.dtype}"
    if requested is not None:
        chosen = get(requested, _source(backend))
        reasons = chosen.not_supported_reasons(replace(inputs, forced=True))
        if reasons:
            source = "backend=" if backend is not None else f"{ENV_VAR}="
            raise NotImplementedError(f"{source}{requested!r} cannot run {op} on {where}: "
                                      + "; ".join(reasons) + f". Unset it to let vidkern choose among {names()}.")
        return chosen
    report = []
    for name in order(op, inputs):
        reasons = _BACKENDS[name].not_supported_reasons(replace(inputs, forced=False))
        if not reasons:
            return _BACKENDS[name]
        report.append(f"{name}: " + "; ".join(reasons))
    raise NotImplementedError(f"no vidkern backend can run {op} on {where}:\n  " + "\n  ".join(report))


def rules() -> list:
    """The dispatch rules as text lines (``python -m vidkern.info``)."""
    lines = [f"priority: {' > '.join(names())} (unless backend= or the {ENV_VAR} environment variable forces one)"]
    for op in OPS:
        if op in PREFERENCES:
            lines.append(f"{op}: {' > '.join(order(op))} — {PREFERENCES[op][1]}")
        if op in RULES:
            lines.append(f"{op}: {' before '.join(RULES[op][1])} {RULES[op][2]}")
    for name in names():
        if fallbacks(name):
            lines.append(f"forced {name}: {', '.join(fallbacks(name))} fall back to automatic dispatch "
                         "(it has no kernels for them)")
    forced = requested_backend()
    if forced in names():      # (an unknown name is reported by info itself)
        lines.append(f"{ENV_VAR}={forced} forces {forced} for "
                     f"{', '.join(op for op in OPS if op not in fallbacks(forced)) or 'no op'}")
    return lines
