"""``python -m vidkern.aot``: compile every Triton kernel the launchers launch, for sm_80 and sm_90,
exactly as Triton's JIT compiles it, without a GPU; report registers, shared memory, spills and a
static reading of the SASS (:mod:`vidkern.sass`) — and the same for every kernel of the built CUDA
extension ``vidkern._C``.

*What is compiled is what runs.* Every module of ``vidkern.kernels`` that exports ``aot_specs`` (found
by :func:`spec_modules`) declares its configurations (:class:`vidkern.kernels.launch.AotSpec`, built
from the functions its launchers call) and exports ``aot_launches(dtype)``: calls of its own
launchers on CPU tensors at the reference shapes, then at shapes that reach every declared
configuration. :func:`variants` runs them under :func:`recording`, which replaces Triton's launch by
a recorder computing the compile inputs with Triton's own JIT code (its argument binder and
``_pack_args``): an int argument equal to 1 becomes a constant, pointers and ints divisible by 16 get
``tt.divisibility`` 16, ``do_not_specialize`` is honoured. Each distinct result is one
:class:`Variant`, compiled by :func:`compile_variant`. A launch that matches no declared
configuration, or a declared one never launched, is reported and fails the check; so do a compile
error, spills (``STACK``/``LOCAL`` > 0 or ``LDL``/``STL`` in the SASS; only the work-counting debug
forward, launched by tests alone, is let through), shared memory over the architecture's limit, and
a kernel whose code lacks the instructions it must hold (tensor-core ``mma`` for the attention and
merge kernels; a kernel the compiler proved dead compiles to a handful of registers and "no
spills"). Another shape may specialise differently (a size that is not a multiple of 16 loses its
hint): the table names each variant's specialisation (``unit:`` ints compiled as the constant 1,
``nohint:`` ints without the hint) and the launch that produced it.

The CUDA extension's kernels are read from the built ``.so`` (one cubin per architecture in
``VIDKERN_CUDA_ARCHS``): registers, static shared memory, spills, and the SASS each must hold —
global stores, 16-byte loads (``LDG.E.128``) in the packed variants, warp shuffles in the
one-warp-per-token kernels. Its dynamic shared memory is sized by the launcher (``(1 + 8) * D``
floats at most, 36 KiB at D = 1024) and is not in the cubin; nor is its block size (CTAs per SM
are left blank).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

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
    case: str = ""      # Triton: the recorded launch that compiled it (vidkern.aot.Variant.case)
    sass: object = None  # the static SASS report (vidkern.sass.Report)
    local: int = 0       # local-memory instructions (LDL/STL) in the SASS
    function: str = ""   # the kernel's function name as a launch names it (Triton: ``fn.__name__``)
    dtype: str = ""      # the inputs' dtype (bf16, fp16, fp32; "" for a CUDA kernel without one)
    constexprs: dict = field(default_factory=dict)   # the declared configuration (CUDA: the pack V)

    @property
    def debug(self) -> bool:
        return " debug " in f" {self.config} "

    @property
    def needs_mma(self) -> bool:
        return (self.kernel.startswith(("hsda fwd", "hsda bwd_dkdv", "hsda bwd_dq", "hsda packed", "sttm merge"))
                and not self.kernel.startswith("sttm merge_rows"))     # the materialised merge's row kernels

    @property
    def ok(self) -> bool:
        """Clean: compiled, no spills (the work-counting debug variant, launched only by tests, may
        spill a little), shared memory within the limit, tensor-core code where there must be."""
        return (not self.error and ((self.spill == 0 and self.local == 0) or self.debug) and self.shared <= SHARED_LIMIT[self.arch]
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


@dataclass
class Variant:
    """One kernel variant as Triton's JIT compiles it for a recorded launch: the declared
    configuration it is (``spec``), the first launch that made it (``case``), and the compile
    inputs per architecture — the JIT's own ``(signature, constexprs, attrs, options)``."""
    spec: object
    case: str
    signature: dict
    constexprs: dict          # {(argument index,): value}, the JIT's constants included
    attrs: dict               # {(argument index,): [["tt.divisibility", 16]] or []}
    options: dict             # arch -> the backend options (num_warps, num_stages, ...)

    def _ints(self, test) -> list:
        names = list(self.signature)
        return [n for i, n in enumerate(names) if test(i, self.signature[n])]

    @property
    def specialisation(self) -> str:
        """The JIT's specialisation of the int arguments, in short: those compiled as the constant 1
        (``unit``) and those without a 16-divisibility hint (``nohint``: not a multiple of 16, or marked
        ``do_not_specialize``)."""
        declared = set(self.spec.constexprs)
        unit = self._ints(lambda i, kind: kind == "constexpr" and list(self.signature)[i] not in declared
                          and self.constexprs.get((i,)) == 1)
        odd = self._ints(lambda i, kind: kind.startswith("i") and not self.attrs.get((i,)))
        return " ".join(filter(None, [f"unit:{','.join(unit)}" if unit else "", f"nohint:{','.join(odd)}" if odd else ""]))

    def key(self, arch: int) -> tuple:
        return (id(self.spec.fn), tuple(self.signature.items()), tuple(sorted(self.constexprs.items(), key=str)),
                tuple(sorted((k, repr(v)) for k, v in self.attrs.items())), repr(sorted(self.options[arch].items())))


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class _RecordingDriver:
    """The driver Triton's JIT asks for the current device, stream and target: a CUDA GPU of one
    architecture (device number = the arch, so the JIT's per-device caches never mix with a real
    device's)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def recording(archs=ARCHS):
    """``with recording() as launches:`` — every Triton launch inside goes through Triton's own
    ``JITFunction.run`` for a CUDA GPU of each arch (a stand-in driver) up to the point where the JIT
    would compile: its ``jit_cache_hook`` then records ``(fn, arch, signature, constexprs, attrs,
    options)`` — the JIT's own specialisation — and declines the compile, so nothing is compiled or
    launched. Outside the interpreter only; the launchers run on CPU tensors, their kernels do not."""
    import json

    from triton import knobs
    from triton.runtime import driver

    launches, touched = [], set()
    arch = [archs[0]]

    def hook(*, fn, compile, **_):
        jit = fn.jit_function
        touched.add(jit)
        data = json.loads(compile["specialization_data"])
        constexprs = {tuple(k): v["constexpr"] if isinstance(v, dict) and "constexpr" in v else v
                      for k, v in zip(data["constant_keys"], data["constant_vals"])}
        attrs = {tuple(k): v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
        options = {k: _tuples(v) for k, v in data["options"].items()}   # JSON made the tuples lists
        launches.append((jit, arch[0], dict(compile["signature"]), constexprs, attrs, options))
        return True   # handled: the JIT compiles and launches nothing

    def launch_all(launch):
        """Run ``launch()`` once per arch."""
        previous_driver = driver._active   # None until a real driver was needed: left as found
        for a in archs:
            arch[0] = a
            driver.set_active(_RecordingDriver(a))
            try:
                launch()
            finally:
                driver.set_active(previous_driver)

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        yield launches, launch_all
    finally:
        knobs.runtime.jit_cache_hook = previous
        for jit in touched:   # forget the stand-in devices' binders
            for a in archs:
                jit.device_caches.pop(a, None)


def variants(dtypes=tuple(DTYPES), archs=ARCHS, modules=None) -> tuple:
    """``(variants, problems)``: the distinct :class:`Variant` s the launchers of every kernel module
    (or ``modules``) launch for ``dtypes`` — each module's ``aot_launches(dtype)`` run under
    :func:`recording` — and what does not add up: a launch no declared spec (``aot_specs``) matches,
    a declared spec no launch reaches."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    default_stages = make_backend(GPUTarget("cuda", archs[0], 32)).parse_options({}).num_stages
    found, problems = {}, []
    for module, dtype in itertools.product(modules or spec_modules(), dtypes):
        specs = module.aot_specs(dtype)
        reached = set()
        for case, launch in module.aot_launches(dtype):
            with recording(archs) as (launches, launch_all):
                launch_all(launch)
            per_launch = {}
            for fn, arch, signature, constexprs, attrs, options in launches:
                per_launch.setdefault(arch, []).append((fn, signature, constexprs, attrs, options))
            for calls in zip(*(per_launch[a] for a in archs)):   # the same launch, once per arch
                fn, signature, constexprs, attrs, _ = calls[0]
                options = {a: call[4] for a, call in zip(archs, calls)}
                names = list(signature)
                by_name = {names[i]: v for (i,), v in constexprs.items()}
                opts = options[archs[0]]
                spec = next((s for s in specs if s.matches(fn, by_name, opts["num_warps"], opts["num_stages"],
                                                           default_stages)), None)
                if spec is None:
                    problems.append(f"{module.__name__} {DTYPES[dtype]} {case}: {fn.fn.__name__} launched with "
                                    f"{by_name} w={opts['num_warps']} s={opts['num_stages']}, which no aot_specs entry declares")
                    continue
                reached.add(id(spec))
                v = Variant(spec, f"{module.__name__.rsplit('.', 1)[-1]} {case}", signature, constexprs, attrs, options)
                found.setdefault(v.key(archs[0]), v)
        problems += [f"{module.__name__} {DTYPES[dtype]}: declared {s.name} {s.label} is never launched by aot_launches"
                     for s in specs if id(s) not in reached]
    return list(found.values()), problems


def compile_variant(variant: Variant, arch: int) -> Result:
    """Compile one recorded :class:`Variant` for ``arch`` exactly as Triton's JIT would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = variant.spec
    res = Result(f"{spec.family} {spec.name}", " ".join(filter(None, [spec.label, variant.specialisation])), arch,
                 case=variant.case, function=spec.fn.__name__, dtype=DTYPES[spec.dtype],
                 constexprs={k: v for k, v in spec.constexprs.items() if isinstance(v, (bool, int, float, str))})
    try:
        compiled = triton.compile(ASTSource(fn=spec.fn, signature=variant.signature, constexprs=variant.constexprs,
                                            attrs=variant.attrs),
                                  target=GPUTarget("cuda", arch, 32), options=variant.options[arch])
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return res
    return _resources(res, compiled, variant.options[arch]["num_warps"])


#: a tl.dot in Triton's TTIR: its input precision and operand element type (the interpreter ignores
#: ``input_precision``, so the precision a kernel really uses is read from the compiled code)
_TTIR_DOT = re.compile(r"tt\.dot .*?inputPrecision = (\w+).*?: tensor<[\dx]+x(\w+)>")


def _resources(res: Result, compiled, warps: int) -> Result:
    from . import sass
    res.dots = tuple(sorted({f"{elem}:{prec}" for prec, elem in _TTIR_DOT.findall(compiled.asm["ttir"])}))
    res.shared = compiled.metadata.shared
    res.mma = bool(re.search(r"\b(wgmma|mma)\.", compiled.asm["ptx"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        listing = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in usage.splitlines() if "REG:" in ln), "")
    fields = dict(re.findall(r"(\w+):(\d+)", line))
    res.regs = int(fields.get("REG", 0))
    res.spill = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
    res.local = len(re.findall(r"\b(?:LDL|STL)\b", listing))   # local-memory instructions in the code itself
    res.sass = sass.report(listing, res.arch, res.regs, res.shared, warps)
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
    from . import sass
    listing = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    code = sass.functions(listing)   # (arch, mangled name) -> SASS
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
        text = code.get((arch, mangled), "")
        missing = [need for need in _cuda_requirements(kernel, pack) if not re.search(need, text)]
        results.append(Result(f"cuda {kernel.removesuffix('_kernel')}", config, arch, regs=int(fields.get("REG", 0)),
                              shared=int(fields.get("SHARED", 0)),
                              spill=int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
                              missing=" ".join(need.replace("\\", "") for need in missing),
                              function=kernel.removesuffix("_kernel"), dtype=_CUDA_DTYPES.get(dtype, dtype),
                              constexprs={"V": int(pack)} if pack else {},
                              sass=sass.report(text, arch, int(fields.get("REG", 0)), int(fields.get("SHARED", 0)), 0)))
    return sorted(results, key=lambda r: (r.kernel, r.config, r.arch))


def table(results) -> str:
    lines = ["| kernel | config | arch | regs | smem KiB | spills | CTAs/SM | tensor cores | main loop, per warp | "
             "launch | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        status = (("ok (debug variant spills)" if r.spill else "ok") if r.ok else
                  (r.error or ("spills" if r.spill or r.local else "smem over limit" if r.shared > SHARED_LIMIT[r.arch]
                               else f"lacks {r.missing}" if r.missing else "no mma")))
        rep = r.sass
        ctas = (rep.ctas_per_sm or "-") if rep else "-"
        loop = rep.text().split(": ", 1)[1] if rep else "-"
        lines.append(f"| {r.kernel} | {r.config} | sm_{r.arch} | {r.regs} | {r.shared / 1024:.1f} | {r.spill} | "
                     f"{ctas} | {rep.mma if rep else '-'} | {('' if not rep or rep.loop else 'no loop: ') + loop} | "
                     f"{r.case or '-'} | {status} |")
    return "\n".join(lines)


def as_dict(r: Result) -> dict:
    """One row of ``--json``: the :class:`Result` fields, its SASS report flattened (``ctas_per_sm``,
    ``tensor_cores``, ``loop``: per-iteration counts or None, ``kernel_counts``), and ``ok``."""
    out = {k: v for k, v in asdict(r).items() if k != "sass"}
    rep = r.sass
    out.update(ok=r.ok, warps=rep.warps if rep else 0, ctas_per_sm=rep.ctas_per_sm if rep else 0,
               tensor_cores=rep.mma if rep else "", loop=rep.loop if rep else None,
               kernel_counts=rep.kernel if rep else None, outer=rep.outer if rep else None,
               fma_loop=rep.fma_loop if rep else None, fma_outer=rep.fma_outer if rep else None)
    return out


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
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES.values()), help="default all")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--json", help="also write every row, with its SASS report, as JSON to this file")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    dtypes = tuple(t for t, name in DTYPES.items() if not args.dtype or name in args.dtype)
    found, problems = variants(dtypes, archs)
    results = [compile_variant(v, arch) for v in found for arch in archs]
    cuda = [r for r in cuda_resources() if r.arch in archs]
    results += cuda
    text = table(results)
    if not cuda:
        text += "\n\nThe CUDA extension vidkern._C is not built: its kernels are not in this table."
    if problems:
        text += "\n\nLaunches and declarations that do not match (kernels/*.py aot_specs, aot_launches):\n" + \
            "\n".join(f"- {p}" for p in problems)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([as_dict(r) for r in results], f, indent=1)
    bad = [r for r in results if not r.ok]
    import triton
    print(f"\ntriton {triton.__version__}: {len(results) - len(bad)} of {len(results)} configurations compile cleanly",
          file=sys.stderr)
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main())
