"""The cases every backend is held to: each op's shared awkward shapes, against the float64 reference.

:data:`CASES` lists, per op of :data:`vidkern.dispatch.OPS`, a few small inputs chosen to break
kernels: odd grids and ragged tiles, one-token and one-channel edges, strided views (a fused qkv
projection, channels-first tokens), broadcast position features, explicit patterns with an unused
id. :func:`check` runs one case on one backend in one dtype — outputs and every input gradient
against the float64 reference by the tolerance rule of :mod:`vidkern.verify`; selection picks by
float64 optimality given the backend's own earlier picks — and raises ``AssertionError`` when the
backend is wrong.

Nothing here names a backend: ``tests/test_backends.py`` runs every registered backend x the ops
and dtypes it declares x these cases, so a new backend is tested by being registered, and a new
op by adding its cases here (a test fails for an op without any). ``python -m vidkern.selftest``
runs the first case of each op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import dispatch, ops, reference as R, verify


@dataclass(frozen=True)
class Case:
    """One input set of ``op``: ``make()`` builds the inputs (CPU, float32 or integer; the check
    casts and moves them), ``run(backend)`` the function under test, ``reference`` the same function
    of :mod:`vidkern.reference` (``None``: selection, judged by greedy optimality), ``facts`` the
    shape facts dispatch checks (:class:`vidkern.dispatch.Inputs`)."""

    op: str
    label: str
    make: Callable[[], list]
    run: Optional[Callable[[str], Callable]] = None
    reference: Optional[Callable] = None
    facts: dict = field(default_factory=dict)
    grad_factor: float = 2.0   # the tolerance rule's factor for gradients (LARGE: see there)

    def reasons(self, backend: str, device: torch.device, dtype: torch.dtype) -> list:
        """Why ``backend`` does not run this case (empty: it must, and must be right)."""
        return dispatch.get(backend).reasons(self.op, device, dtype, forced=True, **self.facts)


def _fused_qkv(b, n, h, d):
    """(B, H, N, d) views of one (B, N, 3, H, d) projection, as an attention module makes them."""
    return list(torch.randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0))


def _channels_first(x):
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _hsda(label, grid, hg, pattern, d, make, grad_factor=2.0):
    return Case("hsda", label, make,
                lambda be: (lambda q, k, v: ops.hsda(q, k, v, grid, hg, pattern=pattern, backend=be)),
                lambda q, k, v: R.hsda(q, k, v, grid, hg, pattern=pattern), {"head_dim": d}, grad_factor)


def _feature(label, channels, make, grad_factor=2.0):
    return Case("feature_summary", label, make, lambda be: (lambda a: ops.feature_summary(a, backend=be)),
                R.feature_summary, {"channels": channels}, grad_factor)


def _gate(label, channels, make, grad_factor=2.0):
    return Case("team_gate", label, make, lambda be: (lambda a, b: ops.team_gate(a, b, backend=be)),
                R.team_gate, {"channels": channels}, grad_factor)


def _merge(label, b, length, lp, du, d, e_batch, strided, tau=1.0, grad_factor=2.0):
    idx = torch.stack([torch.randperm(length, generator=torch.Generator().manual_seed(i))[:lp].sort().values
                       for i in range(b)])

    def make():
        u = R.normalize(torch.randn(b, length, du))
        x = torch.randn(b, length, 2 * d)[..., ::2] if strided else torch.randn(b, length, d)
        return [u, x, torch.randn(e_batch, length, d)]
    return Case("soft_merge", label, make,
                lambda be: (lambda u, x, e: ops.soft_merge(u, idx.to(u.device), x, e, tau, backend=be)),
                lambda u, x, e: R.soft_merge(u, idx.to(u.device), x, e, tau), grad_factor=grad_factor)


def _select(label, b, length, d, k):
    starts = torch.arange(b) * 7 % length
    return Case("orthogonal_select", label, lambda: [torch.randn(b, length, d), starts, k])


def _mean(label, grid, pattern, make):
    return Case("group_mean", label, make, lambda be: (lambda a: ops.group_mean(a, grid, pattern, backend=be)),
                lambda a: R.group_mean(a, grid, pattern))


#: The gradient factor of the large-magnitude cases. A backward from saved softmax statistics
#: recomputes ``exp(x - m)`` (attention: ``exp(S - lse)``), whose float32 error grows with the
#: magnitude; at logits of ~100 correct kernels measured 1.1-4x the reference's own error on the
#: gradients (the forward keeps the 2x rule). A kernel without the max subtraction gives inf/NaN.
LARGE = 8.0

_UNUSED_ID = torch.tensor([0, 2, 2, 0, 3, 3, 0, 2, 3, 0, 0, 2])   # ids 0, 2, 3 on 12 tokens; id 1 unused

#: op -> its cases (the first is the quick one: ``python -m vidkern.selftest``). Every softmax of
#: every op has a case far past exp's float32 range (logits of several hundred): a kernel that
#: skips the max subtraction returns inf/NaN there, which ordinary-magnitude inputs never show.
CASES = {
    "hsda": [
        _hsda("grid (3, 5, 7), 2 of 4 heads global, d=64, strided q/k/v", (3, 5, 7), 2, "checkerboard", 64,
              lambda: _fused_qkv(1, 105, 4, 64)),
        _hsda("temporal, grid (2, 3, 3), d=32", (2, 3, 3), 1, "temporal", 32,
              lambda: [torch.randn(1, 3, 18, 32) for _ in range(3)]),
        _hsda("explicit ids with an unused id, d=32", (1, 3, 4), 1, _UNUSED_ID, 32,
              lambda: [torch.randn(2, 2, 12, 32) for _ in range(3)]),
        _hsda("1x1 spatial grid (one group), sparse heads only", (5, 1, 1), 0, "checkerboard", 32,
              lambda: [torch.randn(1, 2, 5, 32) for _ in range(3)]),
        _hsda("large logits (|q.k| * scale up to ~110, past exp's float32 range), d=32", (2, 3, 4), 1, "checkerboard", 32,
              lambda: [torch.randn(1, 2, 24, 32) * 5.5 for _ in range(3)], LARGE),
    ],
    "feature_summary": [
        _feature("(2, 37, 96)", 96, lambda: [torch.randn(2, 37, 96) * 2]),
        _feature("one token, 5 channels", 5, lambda: [torch.randn(1, 1, 5)]),
        _feature("(3, 98, 64), channels-first", 64, lambda: [_channels_first(torch.randn(3, 98, 64))]),
        _feature("large magnitudes, 60 * randn", 48, lambda: [torch.randn(2, 40, 48) * 60], LARGE),
    ],
    "team_gate": [
        _gate("(2, 37, 96), channels-first x", 96, lambda: [_channels_first(torch.randn(2, 37, 96) * 2), torch.randn(2, 96)]),
        _gate("one token, 5 channels", 5, lambda: [torch.randn(1, 1, 5), torch.randn(1, 5)]),
        _gate("(2, 50, 384), strided h", 384, lambda: [torch.randn(2, 50, 384), torch.randn(2, 768)[:, ::2]]),
        _gate("large magnitudes, 60 * randn", 48, lambda: [torch.randn(2, 40, 48) * 60, torch.randn(2, 48) + 4], LARGE),
    ],
    "soft_merge": [
        _merge("(2, 50 -> 17, 16), broadcast e", 2, 50, 17, 16, 16, 1, False),
        _merge("(1, 33 -> 7), Du=8, D=24, strided x", 1, 33, 7, 8, 24, 1, True),
        _merge("(3, 20 -> 20), every token a meta token", 3, 20, 20, 16, 8, 3, False),
        _merge("large logits: tau = 0.005 (|S| up to 200)", 2, 40, 9, 16, 16, 1, False, tau=0.005, grad_factor=LARGE),
    ],
    "orthogonal_select": [
        _select("(2, 50, 16), k=17", 2, 50, 16, 17),
        _select("one token, k=1", 1, 1, 8, 1),
        _select("(3, 37, 40), every token picked", 3, 37, 40, 37),
    ],
    "group_mean": [
        _mean("(2, 105, 96), checkerboard", (3, 5, 7), "checkerboard", lambda: [torch.randn(2, 105, 96)]),
        _mean("(2, 18, 8), temporal", (2, 3, 3), "temporal", lambda: [torch.randn(2, 18, 8)]),
        _mean("(1, 12, 4), global", (1, 3, 4), "global", lambda: [torch.randn(1, 12, 4)]),
    ],
}


def check(case: Case, backend: str, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ``AssertionError`` (or the backend's own error) when ``backend`` is wrong on ``case``."""
    inputs = case.make()
    if case.op == "orthogonal_select":
        x, start, k = inputs
        x, start = x.to(dtype).to(device), start.to(device)
        verify.assert_greedy_picks(ops.orthogonal_select(x, k, start, backend=backend), x, start)
        return
    run = case.run(backend)

    def on_device(*args):   # float64 truth is built on the CPU; the backend runs on ``device``
        outs = run(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
        return tuple(o.cpu() for o in (outs if isinstance(outs, tuple) else (outs,)))
    verify.check_against_reference(f"{case.op} [{case.label}]", on_device, case.reference, inputs, dtype,
                                   grad_factor=case.grad_factor)
