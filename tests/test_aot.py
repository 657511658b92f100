"""Ahead-of-time compilation of every Triton kernel configuration for sm_80 and sm_90 (no GPU
needed): no compile errors, no spills, shared memory within the limit, tensor-core code.

The test suite runs Triton in interpreter mode (no GPU), so compilation happens in fresh
subprocesses without ``TRITON_INTERPRET``."""
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


def test_every_launcher_configuration_compiles_cleanly(tmp_path):
    out = tmp_path / "aot.md"
    run = aot.run_in_subprocess("--out", str(out))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| ") and "kernel" not in ln]
    expected = len(list(aot.spec_configurations()))
    assert [m.__name__.rsplit(".", 1)[1] for m in aot.spec_modules()] == ["hsda", "merge", "selection", "team"]
    # HSDA: archs x (fp16, bf16: d<=128; fp32: d<=64) x (7 kernels + the debug forward);
    # TEAM: archs x 3 dtypes x (3 column kernels + the dh reduction + 4 row kernels x 5 channel blocks);
    # STTM selection: archs x 3 dtypes x (inverse norms, Gram, 8 greedy widths, the streaming fallback);
    # STTM merge: archs x (13 fp16 + 13 bf16 + 9 fp32 channel-chunk variants of its 5 kernels)
    assert expected == 2 * (3 + 3 + 2) * (7 + 1) + 2 * 2 * (3 * 3 + 3 * 3 + 2 * 1) + 2 * 3 * (4 + 4 * 5) + 2 * 3 * 11 + 2 * (22 + 22 + 15)
    assert len(rows) == expected + len(aot.cuda_resources())
    assert any(r.startswith("| team gate_bwd") for r in rows) and any(r.startswith("| sttm merge_bwd_meta") for r in rows)
    assert all(r.endswith("| ok |") or (" debug |" in r and "| ok (debug" in r) for r in rows)
    assert all(r.endswith("| ok |") for r in rows if " debug |" not in r)
    assert any("sm_90" in r and "| hsda fwd |" in r for r in rows) and any("sm_80" in r for r in rows)
    assert sum(" debug |" in r for r in rows) == 2 * (3 + 3 + 2)     # the debug forward per arch, dtype, head dim


def test_the_check_catches_spills():
    """It can fail: a float32 tile far too large for the register file is reported as spilling."""
    out = _python("""
        import torch
        from vidkern import aot
        from vidkern.kernels import hsda as K
        K.pick_config = lambda *a, **k: K.tile_config(128, 128, 4, 2)
        r = aot.compile_spec(K.tile_aot_spec("bwd_dkdv", torch.float32, 128, 1), 80)
        print(r.error == "", r.spill > 0, r.ok)
    """)
    assert out.split() == ["True", "True", "False"]


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


def test_the_check_compiles_what_the_launchers_launch():
    """Tiles, warps and stages come from the launchers' own functions, on the running Triton
    (compilation replaced by a recorder)."""
    out = _python("""
        import torch, triton
        from vidkern import aot
        from vidkern.kernels import hsda as K, team as T
        seen = []
        def record(src, target=None, options=None):
            names = list(src.signature)   # src.constants: {(argument index,): value}
            seen.append(({names[i]: v for (i,), v in src.constants.items()}, options))
            raise RuntimeError("recorded")
        triton.compile = record
        c = T.summary_config(384)
        n, d, w = c.BLOCK_N, c.BLOCK_D, c.num_warps
        specs = {(s.name, s.dtype, s.constexprs.get("BLOCK_D")): s for s in T.aot_specs(torch.float16) + T.aot_specs(torch.float32)}
        for kernel in ("summary_fwd", "summary_bwd"):
            r = aot.compile_spec(specs[(kernel, torch.float16, d)], 80)
            print(r.config == f"fp16 BLOCK_N={n} BLOCK_D={d} w={w}", seen[-1][1] == dict(num_warps=w),
                  (seen[-1][0]["BLOCK_N"], seen[-1][0]["BLOCK_D"]) == (n, d))
        c = T.rows_config(1000)
        n, d, w = c.BLOCK_N, c.BLOCK_D, c.num_warps
        r = aot.compile_spec(specs[("gate_bwd", torch.float32, d)], 90)
        print(r.config == f"fp32 BLOCK_N={n} BLOCK_D={d} w={w}", seen[-1][1] == dict(num_warps=w))
        for kernel, kind in (("fwd", "fwd"), ("bwd_dkdv", "bwd"), ("bwd_dq", "bwd")):
            cfg = K.configs()[(kind, "fp32", 64)]
            aot.compile_spec(K.tile_aot_spec(kernel, torch.float32, 64, 1), 80)
            consts, options = seen[-1]
            print(options == dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                  (consts["BLOCK_M"], consts["BLOCK_N"]) == (cfg.BLOCK_M, cfg.BLOCK_N))
    """)
    assert out.split() == ["True"] * (3 * 2 + 2 + 2 * 3)


def test_the_check_requires_tensor_core_code():
    out = _python("""
        import torch
        from vidkern import aot
        from vidkern.kernels import hsda as K
        r = aot.compile_spec(K.tile_aot_spec("fwd", torch.bfloat16, 64, 1), 90)
        print(r.ok, r.mma, r.regs > 32)   # a dead kernel would compile to a few registers
    """)
    assert out.split() == ["True", "True", "True"]


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
        seen = {}
        for module in (hsda, merge, selection):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for spec in module.aot_specs(dtype):
                    key = (spec.family, spec.name, str(dtype))
                    if key in seen:
                        continue
                    r = aot.compile_spec(spec, 80)
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
