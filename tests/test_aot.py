"""Ahead-of-time compilation of every Triton kernel configuration for sm_80 and sm_90 (no GPU
needed): no compile errors, no spills, shared memory within the limit, tensor-core code.

The test suite runs Triton in interpreter mode (no GPU), so compilation happens in fresh
subprocesses without ``TRITON_INTERPRET``."""
import json
import subprocess
import sys
import textwrap

import pytest

from vidkern import aot
from vidkern.backends import cuda

CUDA_KERNELS = {"summary_fwd", "summary_merge", "summary_bwd", "gate_rows", "token_softmax", "gate_apply",
                "gate_bwd_rows", "token_softmax_bwd", "gate_bwd", "gate_dh",                      # TEAM
                "select_greedy", "merge_lse", "merge_fwd", "merge_bwd_delta", "merge_bwd_tokens", "merge_bwd_meta"}  # STTM
needs_extension = pytest.mark.skipif(aot.extension_path() is None, reason=str(cuda.extension_error()))


def _python(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=600, env=aot.clean_env())
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_every_launched_variant_compiles_cleanly(aot_rows):
    run, rows = aot_rows
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    counts = json.loads(_python("""
        import json
        from vidkern import aot
        found, problems = aot.variants()
        print(json.dumps([len(found), problems, len(aot.cuda_resources())]))
    """))
    assert counts[1] == []                                     # every launch declared, every declaration launched
    assert [m.__name__.rsplit(".", 1)[1] for m in aot.spec_modules()] == ["hsda", "merge", "selection", "team"]
    assert len(rows) == 2 * counts[0] + counts[2]
    triton_rows = [r for r in rows if not r["kernel"].startswith("cuda")]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]][:3]
    assert all(r["spill"] == 0 and r["local"] == 0 for r in triton_rows if " debug " not in f" {r['config']} ")
    assert {r["arch"] for r in rows} == {80, 90}
    # each family's reference launch is among the compiled variants
    cases = {r["case"] for r in triton_rows}
    assert {"hsda d=64 checkerboard 6+6", "merge 784 -> 392, D=768", "selection 1 x 12544 -> 6272",
            "team B=32 N=1568 D=768"} <= cases


def test_the_check_catches_spills():
    """It can fail: a float32 tile far too large for the register file is reported as spilling."""
    out = _python("""
        import torch
        from vidkern import aot
        from vidkern.kernels import hsda as K
        K.pick_config = lambda *a, **k: K.tile_config(128, 128, 4, 2)
        found, problems = aot.variants((torch.float32,), (80,), [K])
        v = next(v for v in found if v.spec.name == "bwd_dkdv" and v.spec.constexprs["HEAD_DIM"] == 64)
        r = aot.compile_variant(v, 80)
        print(r.error == "", r.spill > 0, r.ok, problems == [])
    """)
    assert out.split() == ["True", "True", "False", "True"]


def test_launches_and_declarations_must_agree():
    """A launch no ``aot_specs`` entry declares, and a declared configuration no launch reaches, are
    reported (and fail ``python -m vidkern.aot``)."""
    out = _python("""
        import torch
        from vidkern import aot
        from vidkern.kernels import team as T
        specs = T.aot_specs
        T.aot_specs = lambda dtype: [s for s in specs(dtype) if s.name != "gate_dh"]
        print(sum("_gate_dh_kernel launched" in p for p in aot.variants((torch.float16,), (80,), [T])[1])
              == len(T.aot_launches(torch.float16)))
        T.aot_specs = lambda dtype: specs(dtype) + [T.SMALL_CONFIG.aot("team", "gate_dh", T._gate_dh_kernel, dtype,
                                                                        EXTRA=1)]
        print(sum("never launched" in p for p in aot.variants((torch.float16,), (80,), [T])[1]))
    """)
    assert out.split() == ["True", "1"]    # gate_dh: once per launch case (team_gate's backward)


def test_the_recorder_specialises_as_the_jit():
    """What is compiled is what Triton's JIT compiles for the launch: recorded through the JIT's own
    ``run`` (a stand-in driver, its ``jit_cache_hook``). Its rule, seen on soft_merge's forward:
    unit strides become the constant 1, a 16-divisible size or stride gets the divisibility hint, a
    size that is not a multiple of 16 (L' = 98) none, a broadcast's stride 0 the hint; a
    transposed X's channel stride is no constant; the warps are the launcher's."""
    out = _python("""
        import json, torch
        from vidkern import aot
        from vidkern.kernels import merge as M
        M.merge_materialises = lambda lp, d: False      # the streamed forward: its kernel reads X's strides
        def record(x_transposed):
            with aot.recording((90,)) as (launches, launch_all):
                def launch():
                    u = torch.empty(2, 784, 128, dtype=torch.bfloat16)
                    x = torch.empty(2, 768, 784, dtype=torch.bfloat16).transpose(1, 2) if x_transposed else \
                        torch.empty(2, 784, 768, dtype=torch.bfloat16)
                    e = torch.empty(1, 784, 768, dtype=torch.bfloat16).expand(2, 784, 768)
                    idx = torch.arange(98).expand(2, 98).contiguous()
                    M.soft_merge_forward(u, idx, x, e, 0.1)
                launch_all(launch)
            fn, arch, sig, consts, attrs, options = next(l for l in launches if l[0] is M._merge_fwd_kernel)
            names = list(sig)
            hinted = {names[i] for (i,), a in attrs.items() if a}
            unit = {names[i] for (i,), v in consts.items() if v == 1 and names[i].islower()}
            return dict(unit=sorted(unit), hinted=sorted(h for h in hinted if h.islower() or h in ("L", "LP", "D")),
                        warps=options["num_warps"], sig_sxd=sig["sxd"])
        print(json.dumps([record(False), record(True), M.merge_config("fwd", torch.bfloat16, 6).num_warps]))
    """)
    plain, transposed, warps = json.loads(out)
    assert plain["unit"] == ["sed", "sud", "sxd"] and plain["sig_sxd"] == "constexpr"
    assert {"L", "D", "seb", "sxb", "sxl", "sel"} <= set(plain["hinted"]) and "LP" not in plain["hinted"]
    assert plain["warps"] == warps
    assert "sxd" not in transposed["unit"] and transposed["sig_sxd"] == "i32"


def test_launch_tables_per_triton_version():
    """A launch table is written for the newest Triton, with the entries older ones need laid over
    it (``kernels.launch.for_triton``); each launcher reads the running version's table."""
    import torch

    from vidkern.kernels import hsda as K
    from vidkern.kernels import launch
    assert launch.version_tuple("3.6.0") == (3, 6, 0) and launch.version_tuple("3.8.0+git1a2b") == (3, 8, 0)
    assert launch.version_tuple("3.7") == (3, 7, 0) and launch.version_tuple("3.9.0rc1") == (3, 9, 0)
    base, older = {"a": 1, "b": 2}, {(3, 8): {"a": 10}, (3, 7): {"a": 20, "b": 30}}
    assert launch.for_triton(base, older, (3, 8, 0)) == base == {"a": 1, "b": 2}   # base left as it was
    assert launch.for_triton(base, older, (3, 7, 1)) == {"a": 10, "b": 2}
    assert launch.for_triton(base, older, (3, 6, 0)) == {"a": 20, "b": 30}        # the oldest bound wins
    assert K.configs((3, 8, 0)) == K.CONFIGS and K.configs((3, 9, 1)) == K.CONFIGS
    old = K.configs((3, 6, 0))
    assert old != K.CONFIGS and all(old[key] == cfg for key, cfg in K.CONFIGS_BEFORE[(3, 8)].items())
    for kind, d, dtype in ((kind, d, dtype) for kind in ("fwd", "bwd") for d in K.HEAD_DIMS
                           for dtype in (torch.float16, torch.float32) if d <= K.MAX_HEAD_DIM[K.dtype_class(dtype)]):
        assert K.pick_config(kind, d, dtype, 90) == K.configs()[(kind, K.dtype_class(dtype), d)]


def test_the_check_requires_tensor_core_code(aot_rows):
    _, rows = aot_rows
    fwd = [r for r in rows if r["kernel"] == "hsda fwd" and r["config"].startswith("bf16 HEAD_DIM=64")
           and r["arch"] == 90 and " debug " not in r["config"]]
    assert fwd and all(r["ok"] and r["mma"] and r["regs"] > 32 for r in fwd)   # a dead kernel: a few registers
    out = _python("""
        import torch
        from vidkern import aot
        r = aot.Result("hsda fwd", "bf16", 90, regs=100)
        print(r.needs_mma, r.ok)
    """)
    assert out.split() == ["True", "False"]


@needs_extension
def test_cuda_extension_kernels_are_clean():
    """Every kernel of the built vidkern._C, for sm_80 and sm_90, in every dtype and pack width
    the launchers pick: no spills, and the SASS it must hold (stores; 16-byte loads when packed;
    warp shuffles in the one-warp-per-token kernels)."""
    results = aot.cuda_resources()
    assert {r.kernel.removeprefix("cuda ") for r in results} == CUDA_KERNELS
    bad = [r for r in results if not r.ok]
    assert not bad, aot.table(bad)
    for arch in aot.ARCHS:
        configs = {(r.kernel, r.config) for r in results if r.arch == arch}
        assert ("cuda gate_bwd", "bf16 V=8") in configs and ("cuda gate_bwd", "fp32 V=1") in configs
        assert ("cuda summary_fwd", "fp16 V=8") in configs and ("cuda summary_fwd", "fp32 V=4") in configs
        assert ("cuda token_softmax", "-") in configs and ("cuda select_greedy", "-") in configs
        assert ("cuda merge_bwd_meta", "fp32") in configs
    packed = [r for r in results if r.kernel == "cuda gate_bwd" and "V=8" in r.config]
    assert packed and all(r.regs > 16 for r in packed)   # real code, not a kernel proved dead


@needs_extension
def test_the_cuda_check_can_fail(monkeypatch):
    """It can fail: a kernel lacking a required instruction (tensor-core HMMA, which TEAM never
    uses) is reported."""
    monkeypatch.setattr(aot, "_cuda_requirements", lambda name, pack: [r"HMMA"])
    results = aot.cuda_resources()
    assert results and not any(r.ok for r in results) and all(r.missing == "HMMA" for r in results)


def test_compiled_products_use_the_precision_each_dtype_needs():
    """What the compiled code really multiplies with (the interpreter ignores ``input_precision``):
    float32 kernels' products are "tf32x3" (three TF32 products: float32-level error; plain "tf32"
    has a 1e-3 relative error, SPEC §5's float32 tolerance would not hold on a GPU), and 16-bit
    kernels multiply 16-bit operands on the tensor cores (no upcast to float32). Every kernel with a
    product (hsda tile and packed, soft_merge, the selection Gram), each dtype, sm_80."""
    out = _python("""
        import torch
        from vidkern import aot
        from vidkern.kernels import hsda, merge, selection
        found, _ = aot.variants((torch.float32, torch.float16, torch.bfloat16), (80,), [hsda, merge, selection])
        seen = {}
        for v in found:
            key = (v.spec.family, v.spec.name, str(v.spec.dtype))
            if key not in seen:
                r = aot.compile_variant(v, 80)
                if r.dots:
                    seen[key] = r.dots
        for (family, name, dtype), dots in sorted(seen.items()):
            print(family, name, dtype, ",".join(dots))
    """)
    rows = [line.split() for line in out.splitlines()]
    kernels = {(f, n) for f, n, *_ in rows}
    assert {("hsda", "fwd"), ("hsda", "bwd_dkdv"), ("hsda", "bwd_dq")} <= kernels and len(kernels) >= 8, kernels
    want = {"torch.float32": {"f32:tf32x3"}, "torch.float16": {"f16:tf32"}, "torch.bfloat16": {"bf16:tf32"}}
    for family, name, dtype, dots in rows:
        assert set(dots.split(",")) <= want[dtype] | {"f32:tf32x3"} and set(dots.split(",")) & want[dtype], \
            (family, name, dtype, dots)


def test_the_work_models_table_is_this_compile(aot_rows):
    """``vidkern/work/sass_sm90.json`` (what the work model prices from; it cannot compile under the
    interpreter) equals the sm_90 reports of this AOT run: regenerate it after a kernel change
    (``python -m vidkern.work.compiled``)."""
    import triton

    from vidkern.work import compiled
    table = compiled.table()
    if table["triton"] != triton.__version__:
        pytest.skip(f"the table is Triton {table['triton']}'s SASS, this is {triton.__version__}")
    fresh = {e["key"]: e for e in compiled.entries_from_rows(aot_rows[1])}
    kept = {e["key"]: e for e in table["entries"]}
    assert sorted(fresh) == sorted(kept)
    stale = [k for k in fresh if fresh[k] != kept[k]]
    assert not stale, f"{len(stale)} entries differ from this compile, e.g. {stale[:3]}"
