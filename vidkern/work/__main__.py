"""``python -m vidkern.work OP [key=value ...] [--direction D] [--backend B] [--json] [--measure]``
(``--reference``: the table at the reference shapes instead).

Keys: ``B H N L D d num_out grid=T,Hp,Wp pattern num_global_heads dtype=bf16|fp16|fp32 scores=0|1``.
``N`` and ``L`` name the same token count; ``grid`` sets it when neither is given. ``--measure``
runs the kernels at that (small!) shape with counters — the Triton interpreter, or the CUDA
emulator for ``backend=cuda`` — and prints the counted launches beside the formula's.
``--backend split|views``: hsda's SDPA strategies (SDPA calls priced at FA2's published rate).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from . import DIRECTIONS, MEASURES, OPS, PATHS, Shape, _load_formulas, ratio, records
from .machine import MACHINES, TERMS

_INTS = ("B", "H", "N", "L", "D", "d", "num_out", "num_global_heads")


def parse_shape(op: str, pairs: list) -> Shape:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {pair!r}")
        if key in _INTS:
            if not value.isdigit():
                raise ValueError(f"{key} must be a non-negative int, got {key}={value!r}")
            values[key] = int(value)
        elif key == "grid":
            if not all(v.isdigit() for v in value.split(",")):
                raise ValueError(f"grid must be three ints T,Hp,Wp, got grid={value!r}")
            values[key] = tuple(int(v) for v in value.split(","))
            if len(values[key]) != 3:
                raise SystemExit(f"grid must be T,Hp,Wp, got {value!r}")
        elif key in ("pattern", "dtype"):
            values[key] = value
        elif key == "scores":
            values[key] = value.lower() in ("1", "true", "yes")
        else:
            raise SystemExit(f"unknown key {key!r} (known: {', '.join(_INTS)}, grid, pattern, dtype, scores)")
    if values.get("dtype", "bf16") not in ("bf16", "fp16", "fp32"):
        raise SystemExit(f"dtype must be bf16, fp16 or fp32, got {values['dtype']!r}")
    tokens = values.get("N", values.get("L"))
    if tokens is None and "grid" in values:
        tokens = math.prod(values["grid"])
    if tokens is not None:
        values["N"] = values["L"] = tokens
    shape = Shape(**values)
    if op == "hsda" and math.prod(shape.grid) != shape.N:
        raise SystemExit(f"hsda: N={shape.N} must equal T*Hp*Wp of grid={shape.grid}; give grid=T,Hp,Wp")
    if op in ("orthogonal_select", "select_meta_tokens", "soft_merge") and "num_out" not in values:
        shape.num_out = max(1, shape.L // 2)
    return shape


def _row(r: dict, counted: dict = None) -> str:
    text = (f"  {r['kernel']:<34} programs {r['programs']:>10,}  bytes {r['bytes']:>16,}  macs {r['macs']:>18,}"
            f"  steps {r['steps']:>6,}  model {r['model_us']:>10,.1f} us ({r['bound']})"
            f"\n  {'':<34} DRAM {r['dram_bytes']:>14,.0f} B  " + "  ".join(
                f"{t[:-3]} {r[t]:,.1f}" for t in TERMS if r[t]) + (f"  [{r['compiled']}]" if r.get("compiled") else ""))
    if counted is not None:
        text += (f"\n  {'  counted':<34} programs {counted['programs']:>10,}  bytes {counted['bytes']:>16,}"
                 f"  macs {counted['macs']:>18,}")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidkern.work", description=__doc__.splitlines()[0])
    parser.add_argument("op", nargs="?", choices=OPS)
    parser.add_argument("shape", nargs="*", help="key=value pairs")
    parser.add_argument("--direction", choices=DIRECTIONS + ("both",), default="both")
    parser.add_argument("--backend", choices=PATHS, default="triton",
                        help="a backend, or an SDPA strategy of hsda (split, views)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.add_argument("--measure", action="store_true", help="count the kernels at this shape too")
    parser.add_argument("--reference", action="store_true", help="the table at the reference shapes")
    parser.add_argument("--calibrate", action="store_true", help="the model beside published figures")
    parser.add_argument("--machine", choices=sorted(MACHINES), default="h200", help="the GPU priced (default h200)")
    args = parser.parse_args(argv)
    from . import machine as M
    M.MACHINE = MACHINES[args.machine]
    if args.calibrate:
        from .calibrate import markdown as calibration
        print(calibration())
        return 0
    if args.reference:
        from .report import markdown, reference_rows
        rows = reference_rows()
        if args.json:
            print(json.dumps([{k: v for k, v in r.items() if k != "launches"} for r in rows], indent=1))
        else:
            print(markdown(rows))
        return 0
    if args.op is None:
        parser.error("give an op (or --reference)")
    if args.measure and args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter must be chosen before triton is imported: start over with it
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, "-m", "vidkern.work", *(sys.argv[1:] if argv is None else argv)],
                              env=env).returncode
    _load_formulas()
    try:
        shape = parse_shape(args.op, args.shape)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    directions = DIRECTIONS if args.direction == "both" else (args.direction,)
    out = []
    for direction in directions:
        recs = records(args.op, direction, args.backend, shape)
        if len(recs) == 1:
            continue   # no kernels in this direction (selection's backward)
        counted = None
        if args.measure:
            fn = MEASURES.get((args.op, args.backend))
            if fn is None:
                raise SystemExit(f"no counters for {args.op} on {args.backend}")
            counted = records(args.op, direction, args.backend, shape, counted=fn(direction, shape))
            for r in counted:
                r["counted"] = True
        out.append((direction, recs, counted))
    if args.json:
        print(json.dumps([r for _, recs, counted in out for r in recs + (counted or [])], indent=1))
        return 0
    print(f"{args.op} on {args.backend}: {shape}")
    for direction, recs, counted in out:
        tot = recs[-1]
        print(f"\n{direction}:")
        by_kernel = {}
        for r in counted or []:
            by_kernel.setdefault(r["kernel"], []).append(r)
        for r in recs[:-1]:
            match = by_kernel.get(r["kernel"])
            print(_row(r, match.pop(0) if match else None))
            if r["config"]:
                print(f"  {'':<34} config {r['config']}")
        for extra in (r for rs in by_kernel.values() for r in rs if r["kernel"] != "total"):
            print(_row(extra) + "   (counted only)")
        print(_row(tot, by_kernel.get("total", [None])[0] if counted else None))
        print(f"  bytes/min_bytes {ratio(tot['bytes'], tot['min_bytes']):.2f}   "
              f"macs/useful_macs {ratio(tot['macs'], tot['useful_macs']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
