"""``python -m vidkern.selftest``: does each backend compute the right thing on *this* machine?

In seconds: every backend that can run here, each of its ops at a few small shapes (odd grid,
ragged tiles, non-contiguous inputs) and the dtypes it supports on the device, forward and every
input gradient, against the float64 reference (the tolerance rule of :mod:`vidkern.verify`).
Selection picks are judged by float64 optimality given the backend's own previous picks
(:func:`vidkern.verify.assert_greedy_picks`), since GPU float32 arithmetic may break near-ties
differently. Then one line per backend: ``ok``, ``WRONG`` (with the first failure) or
``unavailable`` (and why). The exit status is 1 when any backend is wrong.

``--device cpu|cuda`` restricts the devices; ``--backend NAME`` (repeatable) the backends.
On CPU, the ``triton`` and ``cuda`` kernels run only in their interpreter/emulator, which this
command does not start (they are slow and verify kernels, not installs); the test suite runs them.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Optional

import torch

from . import dispatch, ops, reference as R, verify

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _cases(device: torch.device) -> list:
    """``(op, label, fn(backend) -> callable, ref_fn, inputs, shape facts)`` at small shapes."""
    grid = (3, 5, 7)
    n = 3 * 5 * 7
    qkv = list(torch.randn(2, n, 3, 8, 64).permute(2, 0, 3, 1, 4).unbind(0))   # strided (B, H, N, d), as a fused qkv
    x = torch.randn(2, 37, 96) * 2
    h = torch.randn(2, 96)
    xs = torch.randn(2, 50, 16)
    u = R.normalize(torch.randn(2, 50, 16))
    idx = R.select_meta_tokens(xs.double(), 17)
    e = torch.randn(1, 50, 16)
    return [
        ("hsda", f"grid {grid}, d=64, strided q/k/v",
         lambda be: (lambda q, k, v: ops.hsda(q, k, v, grid, 4, backend=be)),
         lambda q, k, v: R.hsda(q, k, v, grid, 4), qkv, {"head_dim": 64}),
        ("feature_summary", "(2, 37, 96)", lambda be: (lambda a: ops.feature_summary(a, backend=be)),
         R.feature_summary, [x], {"channels": 96}),
        ("team_gate", "(2, 37, 96), channels-first x", lambda be: (lambda a, b: ops.team_gate(a, b, backend=be)),
         R.team_gate, [x.transpose(1, 2).contiguous().transpose(1, 2), h], {"channels": 96}),
        ("soft_merge", "(2, 50 -> 17, 16)",
         lambda be: (lambda a, b, c: ops.soft_merge(a, idx.to(a.device), b, c, backend=be)),
         lambda a, b, c: R.soft_merge(a, idx.to(a.device), b, c), [u, xs, e], {}),
        ("orthogonal_select", "(2, 50, 16), k=17", None, None, [xs], {}),
        ("group_mean", "(2, 105, 96), checkerboard", lambda be: (lambda a: ops.group_mean(a, grid, backend=be)),
         lambda a: R.group_mean(a, grid), [torch.randn(2, n, 96)], {}),
    ]


def _run_case(op, fn, ref_fn, inputs, dtype, device, backend) -> None:
    """Raise AssertionError (or the backend's own error) when ``backend`` is wrong on this case."""
    moved = [t.to(device) for t in inputs]
    if op == "orthogonal_select":
        x = moved[0].to(dtype)
        start = torch.tensor([3, 41], device=device)
        picks = ops.orthogonal_select(x, 17, start, backend=backend)
        verify.assert_greedy_picks(picks, x, start)
        return
    run = fn(backend)

    def on_device(*args):   # the check builds float64 truth on the CPU; the backend runs on ``device``
        outs = run(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
        return tuple(o.cpu() for o in (outs if isinstance(outs, tuple) else (outs,)))
    verify.check_against_reference(op, on_device, ref_fn, [t.cpu() for t in moved], dtype)


def check_backend(name: str, devices: list, log: Optional[Callable] = None) -> tuple:
    """``(status, detail)`` of backend ``name``: ``"ok"``, ``"wrong"`` or ``"unavailable"``."""
    be = dispatch.get(name)
    why = be.unavailable_reason()
    if why:
        return "unavailable", why
    ran, skipped = [], []
    for device in devices:
        dtypes = [torch.float32] + (list(LOW_PRECISION) if device.type == "cuda" else [])
        for op, label, fn, ref_fn, inputs, shape in _cases(device):
            if op not in be.ops:
                continue
            for dtype in dtypes:
                reasons = be.not_supported_reasons(op, device, dtype, forced=True, **shape)
                if reasons:
                    skipped.append(f"{op} {device.type}/{str(dtype)[6:]}: {reasons[0]}")
                    continue
                try:
                    _run_case(op, fn, ref_fn, inputs, dtype, device, name)
                except Exception as exc:   # wrong numbers or a crash both make the backend wrong here
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    return "wrong", f"{op} {label} {device.type}/{str(dtype)[6:]}: {type(exc).__name__}: {first}"
                ran.append(f"{op}/{device.type}/{str(dtype)[6:]}")
                if log:
                    log(f"  {name}: {op} {device.type}/{str(dtype)[6:]} ok")
    if not ran:
        return "unavailable", "; ".join(sorted(set(s.split(": ", 1)[1] for s in skipped))[:3])
    return "ok", f"{len(ran)} op/device/dtype cases" + (f"; not run: {len(skipped)}" if skipped else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidkern.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), action="append",
                        help="devices to test (default: cpu, and cuda when available)")
    parser.add_argument("--backend", action="append", help=f"backends to test (default: {dispatch.names()})")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    devices = [torch.device(d) for d in (args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    torch.manual_seed(0)
    wrong = False
    for name in args.backend or dispatch.names():
        t0 = time.perf_counter()
        status, detail = check_backend(name, devices, log=print if args.verbose else None)
        wrong |= status == "wrong"
        print(f"{name:<10} {status.upper() if status == 'wrong' else status:<12} {detail} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
