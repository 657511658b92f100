"""Argument checks shared by every backend: one home, run before any kernel launches.

Each check raises ``TypeError`` (wrong kind of object, wrong dtype) or ``ValueError`` (wrong
shape or value) naming the argument, the expected and the actual value (SPEC §5).
"""
from __future__ import annotations

import math
import operator
import os
from typing import Optional, Sequence

import torch

from . import patterns

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def can_read_values(t: torch.Tensor) -> bool:
    """Value checks (index ranges) need real data: not under torch.compile tracing, not on meta."""
    return t.device.type != "meta" and not torch.compiler.is_compiling()


def sync_checks() -> bool:
    """Whether value checks on CUDA tensors may synchronise with the host to raise a ``ValueError``
    (``VIDKERN_SYNC_CHECKS=1``, read per call: a debugging aid). By default they do not: a
    device-to-host copy inside an op drains the launch queue and breaks CUDA-graph capture, so on
    CUDA an index range becomes a device-side assert queued ahead of the kernels (the kernels still
    never read outside a tensor; the error surfaces at the next synchronisation)."""
    return os.environ.get("VIDKERN_SYNC_CHECKS") == "1"


def index_range(name: str, t: torch.Tensor, high: int, what: str = "indices", asynchronous: bool = False,
                distinct: bool = False) -> bool:
    """Require every entry of the int tensor ``t`` in ``[0, high)`` (and, with ``distinct``, no
    value twice in a row of the 2-D ``t``); a ``ValueError`` naming ``name``.

    Returns False when the values cannot be read now (``torch.compile`` tracing, meta tensors):
    the caller must then make the check at run time — the custom ops take ``check_values=True``
    and call this again on real data before any kernel runs; traced code calls
    :func:`assert_index_range`. So no kernel reads outside a tensor, compiled or not.
    CUDA tensors get a device-side assert queued ahead of the kernels instead of a host sync
    (unless :func:`sync_checks`; ``asynchronous``, the run-time check inside a compiled graph, never
    syncs); CPU tensors raise the ValueError.
    """
    if not can_read_values(t):
        return False
    if t.device.type != "cpu" and (asynchronous or not sync_checks()):
        assert_index_range(name, t, high, what, distinct)
        return True
    if t.numel() and not bool(((t >= 0) & (t < high)).all()):
        raise ValueError(f"{name} must hold {what} in [0, {high}), got min {int(t.min())}, max {int(t.max())}")
    if distinct and t.numel():
        rows = (_repeats(t) > 0).nonzero()
        if rows.numel():
            row = int(rows[0])
            values, counts = torch.unique(t[row], return_counts=True)
            raise ValueError(f"{name} must hold distinct {what} in each row, got {values[counts > 1].tolist()} "
                             f"more than once in row {row}")
    return True


def _repeats(t: torch.Tensor) -> torch.Tensor:
    """Per row of the 2-D ``t``: how many entries equal their sorted predecessor."""
    ordered = t.sort(dim=-1).values
    return (ordered[..., 1:] == ordered[..., :-1]).sum(-1)


def assert_index_range(name: str, t: torch.Tensor, high: int, what: str = "indices", distinct: bool = False) -> None:
    """:func:`index_range` for code that ``torch.compile`` traces: a run-time ``torch._assert_async``
    (a ``RuntimeError`` on CPU, a device-side assert on CUDA) in the graph."""
    if t.device.type != "meta" and t.numel():
        torch._assert_async(((t >= 0) & (t < high)).all(), f"{name} must hold {what} in [0, {high})")
        if distinct:
            torch._assert_async((_repeats(t) == 0).all(), f"{name} must hold distinct {what} in each row")


def assert_group_ids(t: torch.Tensor, groups: int) -> None:
    """An explicit pattern's rule for :func:`vidkern.group_mean` (ids in ``[0, groups)``, every id
    used: an empty group would be a mean of nothing, NaN) as run-time asserts, for code that
    ``torch.compile`` traces (the eager check reads the ids on the host)."""
    if t.device.type == "meta" or not t.numel():
        return
    torch._assert_async(((t >= 0) & (t < groups)).all(), f"pattern tensor must hold group ids in [0, {groups})")
    used = torch.zeros(groups, dtype=torch.bool, device=t.device).index_fill_(0, t.clamp(0, groups - 1).long(), True)
    torch._assert_async(used.all(), f"pattern tensor must use every group id in [0, {groups})")


def tensor(name: str, x, ndim: Optional[int] = None, shape_doc: str = "", floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' of shape ' + shape_doc if shape_doc else ''}, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dims), got {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def same_dtype_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.device != ref.device:
            raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")


def grid(value, num_tokens: Optional[int] = None, name: str = "grid") -> tuple:
    """Validate a ``(T, Hp, Wp)`` grid; with ``num_tokens``, require ``N == T * Hp * Wp``."""
    if not isinstance(value, Sequence) or len(value) != 3:
        raise TypeError(f"{name} must be a tuple of three ints (T, Hp, Wp), got {value!r}")
    try:
        value = tuple(integer(name, g) for g in value)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of three ints (T, Hp, Wp), got {value!r}") from None
    if any(g < 1 for g in value):
        raise ValueError(f"{name} must have positive entries (T, Hp, Wp), got {tuple(value)}")
    if num_tokens is not None and patterns.num_tokens(value) != num_tokens:
        t, hp, wp = value
        hint = (" (one more than the grid: a CLS token? vidkern's grid ops take the patch tokens only; "
                "split it off, e.g. x[:, 1:], and keep it out of grouped attention)"
                if num_tokens == patterns.num_tokens(value) + 1 else "")
        raise ValueError(f"number of tokens N={num_tokens} must equal T*Hp*Wp = {t}*{hp}*{wp} = "
                         f"{patterns.num_tokens(value)} for {name}={value}" + hint)
    return value


def pattern(value, num_tokens: int, device: torch.device):
    """Return ``(name, group_ids)``: ``("explicit", ids)`` for a tensor, ``(name, None)`` otherwise."""
    if isinstance(value, torch.Tensor):
        integer_dtype("pattern tensor", value)
        if value.shape != (num_tokens,):
            raise ValueError(f"pattern tensor must have shape (N,) = ({num_tokens},), got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"pattern tensor must be on the inputs' device {device}, got {value.device}")
        if can_read_values(value) and num_tokens and patterns.host_ids(value).min < 0:
            raise ValueError(f"pattern tensor must hold non-negative group ids, got min {patterns.host_ids(value).min}")
        if not can_read_values(value) and value.device.type != "meta" and num_tokens:
            # traced: the same rule as a run-time assert in the graph (RuntimeError on CPU, a
            # device-side assert on CUDA), ahead of every kernel that reads the ids
            torch._assert_async((value >= 0).all(), "pattern tensor must hold non-negative group ids")
        # the caller's own tensor, not a converted copy: the host copy above and the kernels' group
        # tables are cached per tensor object (a new .long() each call would miss every time)
        return "explicit", value
    if value not in patterns.PATTERN_NAMES:
        raise ValueError(f"pattern must be one of {patterns.PATTERN_NAMES} or an int tensor of shape (N,), got {value!r}")
    return value, None


def finite(name: str, value, positive: bool = False) -> float:
    """A finite (optionally positive) Python float. Only comparisons are used, so under
    ``torch.compile`` a symbolically traced float becomes guards on its value (recompiling for
    another sign) instead of being used unchecked; the custom ops check it again when they run."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        bad = (value != value) | (value == math.inf) | (value == -math.inf) | ((value <= 0) if positive else False)
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        value = float(value)
        bad = value != value or value in (math.inf, -math.inf) or (positive and value <= 0)
    if bad:
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} float, got {value}")
    return value


def choice(name: str, value, options: tuple) -> str:
    """One of the strings ``options``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {options}, got {type(value).__name__}")
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def integer(name: str, value) -> int:
    """A Python int from anything that is an integer — ``int``, numpy integers, 0-dim integer
    tensors (``operator.index``) — but not a bool; else a ``TypeError`` naming ``name``."""
    if isinstance(value, (bool, torch.SymInt)) or type(value).__name__ == "bool_" or (
            isinstance(value, torch.Tensor) and (value.dtype == torch.bool or value.dim() != 0)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def integer_dtype(name: str, t: torch.Tensor) -> None:
    """``t`` holds integers: not floating, complex or bool."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")


def count(name: str, value, low: int, high: int) -> int:
    value = integer(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def attention(q, k, v, grid_, num_global_heads, pattern_, scale):
    """Checks for ``hsda``; returns ``(grid, pattern_name, group_ids, num_global_heads, scale)``."""
    q = tensor("q", q, 4, "(B, H, N, d)")
    k = tensor("k", k, 4, "(B, H, N, d)")
    v = tensor("v", v, 4, "(B, H, N, d)")
    same_dtype_device("q", q, k=k, v=v)
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape (B, H, N, d) = {tuple(q.shape)}, got {tuple(x.shape)}")
    _, num_heads, n, d = q.shape
    if n == 0 or d == 0:
        raise ValueError(f"q must have at least one token and a non-empty head dim, got shape {tuple(q.shape)}")
    hg = num_heads // 2 if num_global_heads is None else count("num_global_heads", num_global_heads, 0, num_heads)
    if grid_ is None:
        if hg != num_heads:
            raise ValueError("grid (T, Hp, Wp) is required unless every head is global "
                             f"(num_global_heads={hg}, H={num_heads})")
        grid_ = (1, 1, n)
    grid_ = grid(grid_, n)
    name, ids = pattern(pattern_, n, q.device)
    scale = d ** -0.5 if scale is None else finite("scale", scale)
    return grid_, name, ids, hg, scale


def team_input(x, h=None, needs_h: bool = False):
    """``x``: ``(B, N, D)``; with ``needs_h`` (``team_gate``) also ``h``: ``(B, D)``, same dtype and device."""
    x = tensor("x", x, 3, "(B, N, D)")
    if needs_h or h is not None:
        h = tensor("h", h, 2, "(B, D)")
        same_dtype_device("x", x, h=h)
        if h.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"h must have shape (B, D) = {(x.shape[0], x.shape[2])}, got {tuple(h.shape)}")


def num_out(value, num_tokens: int, name: str = "num_out") -> int:
    return count(name, value, 1, max(num_tokens, 1)) if num_tokens else count(name, value, 1, value)


def selection(x, k_name: str, k, start, scores=None) -> bool:
    """Checks for the selection ops; returns whether ``start``'s values were checked (see :func:`index_range`)."""
    checked = True
    x = tensor("x", x, 3, "(B, L, D)")
    b, length, _ = x.shape
    if length == 0:
        raise ValueError("x must hold at least one token (L >= 1), got L=0")
    count(k_name, k, 1, length)
    if start is not None:
        start = tensor("start", start, 1, "(B,)", floating=False)
        integer_dtype("start", start)
        if start.shape != (b,):
            raise ValueError(f"start must have shape (B,) = ({b},), got {tuple(start.shape)}")
        if start.device != x.device:
            raise ValueError(f"start must be on x's device {x.device}, got {start.device}")
        checked = index_range("start", start, length)
    if scores is not None:
        scores = tensor("scores", scores, 2, "(B, L)")
        if scores.shape != (b, length):
            raise ValueError(f"scores must have shape (B, L) = {(b, length)}, got {tuple(scores.shape)}")
        if scores.device != x.device:
            raise ValueError(f"scores must be on x's device {x.device}, got {scores.device}")
    return checked


def merge(u, idx, x, e, tau) -> tuple:
    """Checks for ``soft_merge``; returns ``(tau, idx_checked)`` (see :func:`index_range`)."""
    u = tensor("u", u, 3, "(B, L, Du)")
    x = tensor("x", x, 3, "(B, L, D)")
    e = tensor("e", e, 3, "(B or 1, L, D)")
    same_dtype_device("x", x, u=u, e=e)
    b, length, d = x.shape
    if u.shape[:2] != (b, length):
        raise ValueError(f"u must have shape (B, L, Du) with (B, L) = {(b, length)}, got {tuple(u.shape)}")
    if e.shape not in ((b, length, d), (1, length, d)):
        raise ValueError(f"e must have shape (B, L, D) or (1, L, D) with (B, L, D) = {(b, length, d)}, got {tuple(e.shape)}")
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor of shape (B, L'), got {type(idx).__name__}")
    if idx.dtype != torch.long:
        raise TypeError(f"idx must be int64 (from select_meta_tokens), got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != b:
        raise ValueError(f"idx must have shape (B, L') with B={b}, got {tuple(idx.shape)}")
    if idx.device != x.device:
        raise ValueError(f"idx must be on x's device {x.device}, got {idx.device}")
    if not 1 <= idx.shape[1] <= max(length, 1):
        raise ValueError(f"idx must select L' tokens with 1 <= L' <= L={length}, got L'={idx.shape[1]}")
    checked = index_range("idx", idx, length, "token indices", distinct=True)
    return finite("tau", tau, positive=True), checked
