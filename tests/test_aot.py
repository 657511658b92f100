"""Ahead-of-time compilation of every Triton kernel configuration for sm_80 and sm_90 (no GPU
needed): no compile errors, no spills, shared memory within the limit, tensor-core code.

The test suite runs Triton in interpreter mode (no GPU), so compilation happens in fresh
subprocesses without ``TRITON_INTERPRET``."""
import subprocess
import sys
import textwrap

from vidkern import aot


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
    expected = len(list(aot.all_configurations())) + len(list(aot.team_configurations()))
    # HSDA: archs x (fp16, bf16: d<=128; fp32: d<=64) x (7 kernels + the debug forward);
    # TEAM: archs x 3 dtypes x (2 column kernels + 4 row kernels x 5 channel blocks)
    assert len(rows) == expected == 2 * (3 + 3 + 2) * (7 + 1) + 2 * 3 * (2 + 4 * 5)
    assert any(r.startswith("| team gate_bwd") for r in rows)
    assert all(r.endswith("| ok |") or (" debug |" in r and "| ok (debug" in r) for r in rows)
    assert all(r.endswith("| ok |") for r in rows if " debug |" not in r)
    assert any("sm_90" in r and "| fwd |" in r for r in rows) and any("sm_80" in r for r in rows)


def test_the_check_catches_spills():
    """It can fail: a float32 tile far too large for the register file is reported as spilling."""
    out = _python("""
        import torch
        from vidkern import aot
        from vidkern.kernels import hsda as K
        K.pick_config = lambda *a, **k: K.Config(128, 128, 4, 2)
        r = aot.compile_one("bwd_dkdv", torch.float32, 128, 1, 80)
        print(r.error == "", r.spill > 0, r.ok)
    """)
    assert out.split() == ["True", "True", "False"]


def test_the_check_requires_tensor_core_code():
    out = _python("""
        import torch
        from vidkern import aot
        r = aot.compile_one("fwd", torch.bfloat16, 64, 1, 90)
        print(r.ok, r.mma, r.regs > 32)   # a dead kernel would compile to a few registers
    """)
    assert out.split() == ["True", "True", "True"]
