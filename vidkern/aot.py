"""``python -m vidkern.aot``: compile every Triton kernel configuration the launchers can pick, for
sm_80 and sm_90, without a GPU, and report registers, shared memory and spills — and the same for
every kernel of the built CUDA extension ``vidkern._C``.

The configurations are not listed here: every module of ``vidkern.kernels`` that exports
``aot_specs(dtype)`` (found by :func:`spec_modules`) declares them as
:class:`vidkern.kernels.launch.AotSpec` s, built from the functions its launchers call — for HSDA
each kernel x dtype x head dim x sparse mode at the tiles ``pick_config`` chooses on the running
Triton version (``vidkern.kernels.launch.for_triton``), specialised the way Triton's JIT
specialises a launch (unit head-dim stride, 16-divisible pointers and strides, which the launcher
guarantees), plus the work-counting debug variant. It reads the cubin's resource usage with the
``cuobjdump`` shipped in the triton wheel. It exits non-zero on a compile error, a spill
(``STACK``/``LOCAL`` > 0), shared memory over the architecture's limit, or a kernel whose code
lacks the instructions it must hold (tensor-core ``mma`` for the attention kernels; a kernel the
compiler proved dead compiles to a handful of registers and "no spills").

The CUDA extension's kernels are read from the built ``.so`` (one cubin per architecture in
``VIDKERN_CUDA_ARCHS``): registers, static shared memory, spills, and the SASS each must hold —
global stores, 16-byte loads (``LDG.E.128``) in the packed variants, warp shuffles in the
one-warp-per-token kernels. Its dynamic shared memory is sized by the launcher (``(1 + 8) * D``
floats at most, 36 KiB at D = 1024) and is not in the cubin.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # opt-in dynamic shared memory per block (A100, H100)
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class Result:
    kernel: str
    config: str
    arch: int
    regs: int = 0
    shared: int = 0
    spill: int = 0
    mma: bool = False
    error: str = ""
    missing: str = ""   # CUDA kernels: required SASS instructions that are absent
    dots: tuple = ()    # Triton: the compiled tl.dot ops as "operand type:input precision" (from TTIR)

    @property
    def debug(self) -> bool:
        return self.config.endswith("debug")

    @property
    def needs_mma(self) -> bool:
        return self.kernel.startswith(("hsda fwd", "hsda bwd_dkdv", "hsda bwd_dq", "hsda packed", "sttm merge"))

    @property
    def ok(self) -> bool:
        """Clean: compiled, no spills (the work-counting debug variant, launched only by tests, may
        spill a little), shared memory within the limit, tensor-core code where there must be."""
        return (not self.error and (self.spill == 0 or self.debug) and self.shared <= SHARED_LIMIT[self.arch]
                and (self.mma or not self.needs_mma) and not self.missing)


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def spec_modules() -> list:
    """The kernel modules of ``vidkern.kernels`` that export ``aot_specs`` (found, not listed)."""
    import importlib
    import pkgutil

    from . import kernels
    found = []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"vidkern.kernels.{info.name}")
        if hasattr(module, "aot_specs"):
            found.append(module)
    return found


def compile_spec(spec, arch: int) -> Result:
    """Compile one :class:`vidkern.kernels.launch.AotSpec` for ``arch``, with the 16-divisibility
    hints Triton's JIT gives a launch on contiguous tensors (pointers)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = spec.signature()
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(sig.items()) if spec.hinted(name, kind)}
    res = Result(f"{spec.family} {spec.name}", spec.label, arch)
    try:
        compiled = triton.compile(ASTSource(fn=spec.fn, signature=sig, constexprs=spec.constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=spec.options())
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return res
    return _resources(res, compiled)


def spec_configurations(archs=ARCHS, dtypes=tuple(DTYPES), head_dims=()):
    """(spec, arch) for every configuration the launchers declare (each kernel module's
    ``aot_specs``); ``head_dims``: only the HSDA kernels of these head dims."""
    for arch, dtype, module in itertools.product(archs, dtypes, spec_modules()):
        for spec in module.aot_specs(dtype):
            if not head_dims or spec.constexprs.get("HEAD_DIM", head_dims[0]) in head_dims:
                yield spec, arch


#: a tl.dot in Triton's TTIR: its input precision and operand element type (the interpreter ignores
#: ``input_precision``, so the precision a kernel really uses is read from the compiled code)
_TTIR_DOT = re.compile(r"tt\.dot .*?inputPrecision = (\w+).*?: tensor<[\dx]+x(\w+)>")


def _resources(res: Result, compiled) -> Result:
    res.dots = tuple(sorted({f"{elem}:{prec}" for prec, elem in _TTIR_DOT.findall(compiled.asm["ttir"])}))
    res.shared = compiled.metadata.shared
    res.mma = bool(re.search(r"\b(wgmma|mma)\.", compiled.asm["ptx"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in usage.splitlines() if "REG:" in ln), "")
    fields = dict(re.findall(r"(\w+):(\d+)", line))
    res.regs = int(fields.get("REG", 0))
    res.spill = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
    return res


# ------------------------------------------------------------------------ the CUDA extension
def extension_path():
    """The built ``vidkern._C`` library, or None when it is not built."""
    import importlib.util
    spec = importlib.util.find_spec("vidkern._C")
    return spec.origin if spec is not None else None


_CUDA_NAME = re.compile(r"(\w+_kernel)(?:<([\w:]+)(?:, (\d+))?>)?\(")
_CUDA_DTYPES = {"float": "fp32", "c10::Half": "fp16", "c10::BFloat16": "bf16"}
# kernel -> SASS it must hold: every kernel stores; the V > 1 variants of the kernels that stream
# X move it in 16-byte loads; the one-warp-per-token kernels reduce with warp shuffles.
_CUDA_PACKED = ("summary_fwd_kernel", "summary_bwd_kernel", "gate_rows_kernel", "gate_apply_kernel",
                "gate_bwd_rows_kernel", "gate_bwd_kernel")
_CUDA_SHUFFLES = ("gate_rows_kernel", "gate_bwd_rows_kernel", "token_softmax_kernel", "token_softmax_bwd_kernel",
                  "select_greedy_kernel")


def _cuda_requirements(name: str, pack: str) -> list:
    needs = [r"STG\.E"]
    if name in _CUDA_PACKED and pack not in ("", "1"):
        needs.append(r"LDG\.E\.128")
    if name in _CUDA_SHUFFLES:
        needs.append(r"SHFL\.BFLY")
    return needs


def _demangle(names: list) -> list:
    run = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    out = run.stdout.splitlines()
    return out if run.returncode == 0 and len(out) == len(names) else names


def cuda_resources(path=None) -> list:
    """One :class:`Result` per kernel x architecture of the built extension (``path``: its ``.so``)."""
    path = path or extension_path()
    if path is None:
        return []
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    code = {}   # (arch, mangled name) -> SASS
    arch, name = 0, None
    for line in sass.splitlines():
        if m := re.search(r"code for sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.search(r"Function : (\S+)", line):
            name = (arch, m.group(1))
            code[name] = []
        elif name is not None:
            code[name].append(line)
    entries, arch = [], 0
    for line in usage.stdout.splitlines():
        if m := re.search(r"arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.match(r"\s*Function (\S+):", line):
            entries.append([arch, m.group(1), ""])
        elif "REG:" in line and entries:
            entries[-1][2] = line
    results = []
    for (arch, mangled, line), pretty in zip(entries, _demangle([e[1] for e in entries])):
        m = _CUDA_NAME.search(pretty)
        kernel, dtype, pack = (m.group(1), m.group(2) or "", m.group(3) or "") if m else (mangled, "", "")
        config = " ".join(filter(None, [_CUDA_DTYPES.get(dtype, dtype), f"V={pack}" if pack else ""])) or "-"
        fields = dict(re.findall(r"(\w+):(\d+)", line))
        text = "\n".join(code.get((arch, mangled), []))
        missing = [need for need in _cuda_requirements(kernel, pack) if not re.search(need, text)]
        results.append(Result(f"cuda {kernel.removesuffix('_kernel')}", config, arch, regs=int(fields.get("REG", 0)),
                              shared=int(fields.get("SHARED", 0)),
                              spill=int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
                              missing=" ".join(need.replace("\\", "") for need in missing)))
    return sorted(results, key=lambda r: (r.kernel, r.config, r.arch))


def table(results) -> str:
    lines = ["| kernel | config | arch | regs | smem KiB | spills | mma | status |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        status = (("ok (debug variant spills)" if r.spill else "ok") if r.ok else
                  (r.error or ("spills" if r.spill else "smem over limit" if r.shared > SHARED_LIMIT[r.arch]
                               else f"lacks {r.missing}" if r.missing else "no mma")))
        lines.append(f"| {r.kernel} | {r.config} | sm_{r.arch} | {r.regs} | {r.shared / 1024:.1f} | {r.spill} | "
                     f"{'yes' if r.mma else '-' if r.kernel.startswith('cuda') else 'no'} | {status} |")
    return "\n".join(lines)


def clean_env() -> dict:
    """The environment without ``TRITON_INTERPRET``: interpreted kernels cannot be compiled."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_in_subprocess(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    """``python -m vidkern.aot ARGS`` in a fresh interpreter (callable from a process that has
    already imported triton in interpreter mode, such as the test suite)."""
    return subprocess.run([sys.executable, "-m", "vidkern.aot", *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env())


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":   # set before triton was imported: start over without it
        return subprocess.run([sys.executable, "-m", "vidkern.aot", *(sys.argv[1:] if argv is None else argv)],
                              env=clean_env()).returncode
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default both)")
    parser.add_argument("--head-dim", type=int, action="append", help="32, 64, 128 (default all)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    results = [compile_spec(*c) for c in spec_configurations(archs, tuple(DTYPES), tuple(args.head_dim or ()))]
    cuda = [r for r in cuda_resources() if r.arch in archs]
    results += cuda
    text = table(results)
    if not cuda:
        text += "\n\nThe CUDA extension vidkern._C is not built: its kernels are not in this table."
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    bad = [r for r in results if not r.ok]
    import triton
    print(f"\ntriton {triton.__version__}: {len(results) - len(bad)} of {len(results)} configurations compile cleanly",
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
