"""Backend selection: the one place that decides which implementation runs an op.

Each backend *declares* the ops, devices and dtypes it supports and answers
``not_supported_reasons(op, device, dtype)``. ``backend=`` (or the ``VIDKERN_BACKEND``
environment variable) forces one and raises with its reasons if it cannot run; otherwise the
first capable backend in priority order runs.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

ENV_VAR = "VIDKERN_BACKEND"

OPS = ("hsda", "feature_summary", "team_gate", "orthogonal_select", "soft_merge", "group_mean")


class Backend:
    """Base class. Subclasses set the class attributes and implement the op methods.

    ``native_autograd = True`` (the reference backend only) means the ops are the functions of
    :mod:`vidkern.reference`, differentiated by PyTorch autograd; otherwise the op runs as a ``torch.library`` custom op whose
    forward and backward are the backend's ``<op>_forward`` / ``<op>_backward`` methods.
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

    def not_supported_reasons(self, op: str, device: torch.device, dtype: Optional[torch.dtype],
                              forced: bool = False, head_dim: Optional[int] = None,
                              channels: Optional[int] = None) -> list:
        """Every reason this backend cannot run ``op`` on these inputs (empty: it can);
        ``forced``: the caller asked for this backend by name."""
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if op not in self.ops:
            reasons.append(f"does not implement {op}")
        if device.type not in self.devices:
            reasons.append(f"device {device.type} not in {sorted(self.devices)}")
        elif dtype is not None and dtype not in self.dtypes.get(device.type, ()):
            reasons.append(f"dtype {dtype} not supported on {device.type}")
        if head_dim is not None and self.max_head_dim is not None and head_dim > self.max_head_dim:
            reasons.append(f"head dim {head_dim} > {self.max_head_dim}")
        if channels is not None and self.max_channels is not None and channels > self.max_channels:
            reasons.append(f"{channels} channels > {self.max_channels}")
        return reasons


_BACKENDS: dict = {}
_PRIORITY: list = []


def register(backend: Backend, priority: int) -> None:
    """Register ``backend``; lower ``priority`` numbers are tried first."""
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
    return [name for _, name in _PRIORITY]


def requested_backend(backend: Optional[str] = None) -> Optional[str]:
    """The backend asked for: ``backend``, else ``$VIDKERN_BACKEND``, else None (automatic)."""
    return backend if backend is not None else (os.environ.get(ENV_VAR) or None)


def select(op: str, device: torch.device, dtype: Optional[torch.dtype], backend: Optional[str] = None,
           **shape) -> Backend:
    """Pick the backend for ``op`` on inputs of ``device``/``dtype``.

    ``backend`` (else ``$VIDKERN_BACKEND``) forces a choice: it must run or this raises
    ``NotImplementedError`` with its reasons. Otherwise the first backend without reasons runs.
    ``shape`` carries the shape facts backends declare limits on (``head_dim`` for attention).
    """
    requested = requested_backend(backend)
    if requested is not None:
        chosen = get(requested, "backend" if backend is not None else f"${ENV_VAR}")
        reasons = chosen.not_supported_reasons(op, device, dtype, forced=True, **shape)
        if reasons:
            source = "backend=" if backend is not None else f"{ENV_VAR}="
            raise NotImplementedError(f"{source}{requested!r} cannot run {op} on {device.type}/{dtype}: "
                                      + "; ".join(reasons) + f". Unset it to let vidkern choose among {names()}.")
        return chosen
    report = []
    for name in names():
        reasons = _BACKENDS[name].not_supported_reasons(op, device, dtype, **shape)
        if not reasons:
            return _BACKENDS[name]
        report.append(f"{name}: " + "; ".join(reasons))
    raise NotImplementedError(f"no vidkern backend can run {op} on {device.type}/{dtype}:\n  " + "\n  ".join(report))
