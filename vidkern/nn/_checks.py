"""Argument checks of the :mod:`vidkern.nn` modules: one home for constructor and forward checks.

Like :mod:`vidkern.checks` (the ops' checks, which these build on), each raises ``TypeError``
(wrong kind of object) or ``ValueError`` (wrong value or shape) naming the argument, the
expected and the actual value, so a bad module argument fails at construction, and a bad input
before any kernel runs, instead of deep inside a matmul or a ``ZeroDivisionError``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import checks, dispatch, patterns


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def positive_float(name: str, value) -> float:
    return checks.finite(name, value, positive=True)


def probability(name: str, value) -> float:
    """A float in ``[0, 1]`` (dropout and drop-path rates)."""
    value = checks.finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


def backend(value: Optional[str]) -> Optional[str]:
    """``None`` (automatic) or a registered backend name (:func:`vidkern.dispatch.names`)."""
    return dispatch.validate_name(value, "backend")


def grid(value) -> Optional[tuple]:
    """An optional default grid ``(T, Hp, Wp)``."""
    return None if value is None else checks.grid(value)


def set_pattern(module: nn.Module, value, grid_: Optional[tuple]) -> None:
    """Validate a group pattern and store it as ``module.pattern``: a name of
    :data:`vidkern.patterns.PATTERN_NAMES`, or an int tensor of shape ``(N,)`` (``N`` of ``grid_``
    when given), kept as a non-persistent buffer so it follows the module across devices."""
    if isinstance(value, torch.Tensor):
        n = patterns.num_tokens(grid_) if grid_ is not None else value.numel()
        if n == 0:
            raise ValueError("pattern tensor must hold at least one group id, got an empty tensor")
        module.register_buffer("pattern", checks.pattern(value, n, value.device)[1], persistent=False)
    else:
        checks.pattern(value, 0, None)          # a known name, or a ValueError listing them
        module.pattern = value


def tokens(x, dim: int, name: str = "x", shape_doc: str = "(B, N, D)") -> torch.Tensor:
    """A float token tensor of rank 3 whose last axis is the module's width ``dim``."""
    x = checks.tensor(name, x, 3, shape_doc)
    if x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape {shape_doc} with D={dim} (the module's dim), "
                         f"got {tuple(x.shape)}")
    return x


def forward_grid(value, default: Optional[tuple], num_tokens: int) -> tuple:
    """The grid of a forward call: ``value``, else the module's ``default``; ``N == T * Hp * Wp``."""
    value = value if value is not None else default
    if value is None:
        raise ValueError("grid (T, Hp, Wp) is required: pass it to the module's constructor or to forward")
    return checks.grid(value, num_tokens)
