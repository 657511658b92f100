"""``python -m vidkern.selftest``: does each backend compute the right thing on *this* machine?

In seconds: every backend that can run here, each of its ops on the first of its awkward cases
(:mod:`vidkern.conformance`: odd grid, ragged tiles, non-contiguous inputs) in the dtypes it
supports on the device, forward and every input gradient, against the float64 reference (the
tolerance rule of :mod:`vidkern.verify`).
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

from . import conformance, dispatch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_backend(name: str, devices: list, log: Optional[Callable] = None) -> tuple:
    """``(status, detail)`` of backend ``name``: ``"ok"``, ``"wrong"`` or ``"unavailable"``."""
    be = dispatch.get(name)
    why = be.unavailable_reason()
    if why:
        return "unavailable", why
    ran, skipped = [], []
    for device in devices:
        dtypes = [torch.float32] + (list(LOW_PRECISION) if device.type == "cuda" else [])
        for op in sorted(be.ops):
            case = conformance.CASES[op][0]          # the quick one; the test suite runs them all
            for dtype in dtypes:
                reasons = case.reasons(name, device, dtype)
                if reasons:
                    skipped.append(f"{op} {device.type}/{str(dtype)[6:]}: {reasons[0]}")
                    continue
                try:
                    conformance.check(case, name, dtype, device)
                except Exception as exc:   # wrong numbers or a crash both make the backend wrong here
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    return "wrong", f"{op} {case.label} {device.type}/{str(dtype)[6:]}: {type(exc).__name__}: {first}"
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
    parser.add_argument("--backend", action="append", choices=dispatch.names(),
                        help=f"backends to test (default: {dispatch.names()})")
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
