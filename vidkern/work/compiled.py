"""What the work model reads from the compiled code: the sm_90 SASS reports of every kernel
configuration (``vidkern.aot`` + :mod:`vidkern.sass`), kept in ``sass_sm90.json`` beside this file.

The tests run under the Triton interpreter and cannot compile, so the model does not compile
either: it reads this table, and ``tests/test_aot.py`` holds the table equal to a fresh AOT run of
the same Triton (the main CI leg). Regenerate it after a kernel or configuration change::

    python -m vidkern.aot --arch 90 --json aot.json && python -m vidkern.work.compiled aot.json

One entry per configuration (kernel function, dtype, declared constexprs, warps), from the first
recorded launch that compiled it — the reference shapes come first (``vidkern.aot``). Debug
variants are left out (tests alone launch them). CUDA kernels are entered under their name
without ``_kernel`` (the name the cuda formulas give their launches), with the pack width ``V``
and ``kThreads / 32`` warps.

:func:`lookup` finds a launch's entry: same function and dtype (any dtype for a kernel declared at
one dtype only), and every declared constexpr the launch's ``config`` also names equal. :func:`dynamic` turns the entry's static counts into what a
program issues: the main loop's body times its iterations plus the rest of the function once.
For a launch with products on a kernel without MMA (SIMT products) the main loop is the kernel's
FMA loop (:attr:`vidkern.sass.Report.fma_loop`). The iterations are not modelled separately: they
are the launch's counted work per program over the work of one static iteration — tensor-core MACs for a loop with MMA (``tf32x3``: three
products per MAC), fp32 FMAs for SIMT products, else global bytes; in a kernel of sequential
steps (a greedy selection) whose main loop is the step loop, the steps. The rest of the loop
around the main loop (``outer`` in the report) runs ``Launch.outer_iters`` times a program (the
formula knows it: the output tiles a program loops over; default: the steps, else once per main
iteration). A loop beside the main one inside that loop counts once per outer trip; one nested
inside the main loop is priced at the main loop's mix.
"""
from __future__ import annotations

import functools
import json
import os
import sys

TABLE = os.path.join(os.path.dirname(__file__), "sass_sm90.json")
CUDA_WARPS = 8          # csrc: kThreads = 256
ARCH = 90


def entries_from_rows(rows: list) -> list:
    """The table's entries from ``python -m vidkern.aot --json`` rows (module docstring)."""
    from ..sass import ctas_per_sm
    out, seen = [], set()
    for r in rows:
        if r["arch"] != ARCH or r.get("error") or " debug" in f" {r['config']} " or not r.get("function"):
            continue
        cuda = r["kernel"].startswith("cuda ")
        warps = CUDA_WARPS if cuda else r["warps"]
        key = (r["function"], r["dtype"], json.dumps(r["constexprs"], sort_keys=True), warps)
        if key in seen:
            continue
        seen.add(key)
        out.append(dict(key=f"{r['kernel']} {r['config']}".strip(), function=r["function"], dtype=r["dtype"],
                        constexprs=r["constexprs"], warps=warps, regs=r["regs"], shared=r["shared"],
                        ctas_per_sm=ctas_per_sm(ARCH, r["regs"], warps, r["shared"]) if cuda else r["ctas_per_sm"],
                        tensor_cores=r["tensor_cores"], loop=r["loop"], outer=r.get("outer"),
                        fma_loop=r.get("fma_loop"), fma_outer=r.get("fma_outer"),
                        kernel=r["kernel_counts"], case=r["case"]))
    return out


@functools.lru_cache(maxsize=None)
def table() -> dict:
    """``{"triton": version, "entries": [...]}`` from :data:`TABLE` (empty without it)."""
    if not os.path.exists(TABLE):
        return {"triton": None, "entries": []}
    with open(TABLE) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _by_function() -> dict:
    out = {}
    for e in table()["entries"]:
        out.setdefault(e["function"], []).append(e)
    return out


def lookup(launch):
    """The entry of a :class:`vidkern.work.Launch` (None: no compiled code, e.g. a torch op)."""
    found = _by_function().get(launch.kernel, [])
    # a kernel declared for one dtype only takes no dtype-dependent input (the greedy selection
    # reads the fp32 Gram whatever the tokens' dtype): its entries serve every dtype
    any_dtype = not any(e["dtype"] == launch.dtype for e in found)
    for e in found:
        if not any_dtype and e["dtype"] not in ("", launch.dtype):
            continue
        triton_kernel = e["function"].startswith("_")      # a CUDA kernel's warps are fixed (CUDA_WARPS)
        if triton_kernel and launch.config.get("num_warps", e["warps"]) != e["warps"]:
            continue
        if all(launch.config.get(k, v) == v for k, v in e["constexprs"].items()):
            return e
    return None


def _loops(entry: dict, launch) -> tuple:
    """(main loop, the loop around it, the whole function) counts for ``launch``: the FMA loop of a
    kernel doing SIMT products when the launch has products, else the main loop."""
    if launch.macs and entry.get("fma_loop"):
        return entry["fma_loop"], entry.get("fma_outer"), entry["kernel"]
    return entry["loop"], entry.get("outer"), entry["kernel"]


def iterations(entry: dict, launch) -> float:
    """Main-loop iterations one program of ``launch`` runs (module docstring); 0 without a loop."""
    loop = _loops(entry, launch)[0]
    if not loop or launch.programs <= 0:
        return 0.0
    warps = entry["warps"]
    if launch.macs and loop["macs"]:
        work, per = launch.macs * (3 if launch.rate == "tf32x3" else 1), loop["macs"]
    elif launch.macs and loop["ffma"]:
        work, per = launch.macs, loop["ffma"] * 32
    elif loop["gbytes"]:
        work, per = launch.bytes, loop["gbytes"]
    else:
        return 1.0
    return work / launch.programs / (per * warps)


def dynamic(entry: dict, launch) -> dict:
    """Instructions, MUFU instructions and barriers one warp of one program issues (module
    docstring): the main loop's body its iterations times, the rest of the loop around it
    ``outer_iters`` times, the rest of the function once."""
    loop, outer, whole = _loops(entry, launch)
    keys = ("instr", "mufu", "bar")
    if not loop:
        return {k: whole[k] for k in keys}
    if launch.steps > 1 and not outer:
        it = launch.steps          # the main loop is the step loop
    else:
        it = iterations(entry, launch)
    if not outer:
        return {k: it * loop[k] + max(0, whole[k] - loop[k]) for k in keys}
    around = launch.outer_iters or (launch.steps if launch.steps > 1 else it)
    return {k: it * loop[k] + around * max(0, outer[k] - loop[k]) + max(0, whole[k] - outer[k]) for k in keys}


def write(rows: list, path: str = TABLE) -> int:
    import triton
    entries = entries_from_rows(rows)
    with open(path, "w") as f:
        json.dump({"triton": triton.__version__, "arch": ARCH, "entries": entries}, f, indent=0, sort_keys=True)
        f.write("\n")
    table.cache_clear()
    _by_function.cache_clear()
    return len(entries)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    with open(args[0]) as f:
        n = write(json.load(f))
    print(f"{TABLE}: {n} configurations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
