"""Backend selection: priorities, forced backends, the environment variable, reasons."""
import subprocess
import sys

import pytest
import torch

import vidkern
from vidkern import dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_automatic_choice_prefers_torch_on_cpu():
    assert dispatch.select(dispatch.Inputs("hsda", CPU, torch.float32)).name == "torch"
    assert dispatch.select(dispatch.Inputs("orthogonal_select", CPU, torch.float32)).name == "torch"
    assert dispatch.names() == ["cuda", "triton", "torch", "reference"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_materialises_where_its_intermediates_are_small(dtype):
    """On CPU, TEAM and the soft merges with L' <= 2 D run the reference (autograd, intermediates
    saved: faster there than recomputing); wider merges stream in the torch backend; a forced
    backend still runs; on CUDA the rule does not apply."""
    pick = lambda op, device=CPU, backend=None, **facts: dispatch.select(
        dispatch.Inputs(op, device, dtype, **facts), backend).name
    assert pick("team_gate") == pick("feature_summary") == "reference"
    assert pick("team_gate", backend="torch") == "torch"
    merge = lambda lp, d, **kw: pick("soft_merge", meta_tokens=lp, token_width=d, **kw)
    assert merge(98, 384) == merge(768, 384) == "reference"
    assert merge(769, 384) == merge(6272, 768) == "torch"
    assert merge(98, 384, backend="torch") == "torch"
    assert dispatch.order("hsda", dispatch.Inputs("hsda", CUDA, dtype)) == dispatch.names()
    # end to end: the op goes where the rule says (the reference path makes no custom-op call)
    u, x = torch.randn(1, 16, 8, dtype=dtype), torch.randn(1, 16, 8, dtype=dtype)
    idx = torch.arange(4)[None]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        graph = vidkern.soft_merge(u.requires_grad_(), idx, x, x)[0].grad_fn
    assert "vidkern" not in type(graph).__name__.lower(), type(graph).__name__


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only rules of the triton backend")
def test_triton_interpreter_runs_only_when_asked_for(monkeypatch):
    triton_backend = dispatch.get("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select(dispatch.Inputs("hsda", CPU, torch.float32), "triton") is triton_backend
    assert "only when backend='triton' is asked for" in " ".join(
        triton_backend.reasons("hsda", CPU, torch.float32))
    # an op the forced backend has no kernels for falls back to automatic dispatch (issue 21)
    assert dispatch.select(dispatch.Inputs("group_mean", CPU, torch.float32), "triton").name == "torch"
    with pytest.raises(NotImplementedError, match="dtype torch.float64 not supported"):
        dispatch.select(dispatch.Inputs("hsda", CPU, torch.float64), "triton")
    with pytest.raises(NotImplementedError, match="head dim 256 > 128"):
        dispatch.select(dispatch.Inputs("hsda", CPU, torch.float16, head_dim=256), "triton")
    with pytest.raises(NotImplementedError, match="float32 with head dim 128 > 64"):
        dispatch.select(dispatch.Inputs("hsda", CPU, torch.float32, head_dim=128), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="needs a CUDA device"):
        dispatch.select(dispatch.Inputs("hsda", CPU, torch.float32), "triton")


def test_forced_backend_and_env_var(monkeypatch):
    assert dispatch.select(dispatch.Inputs("hsda", CPU, torch.float16), "reference").name == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select(dispatch.Inputs("soft_merge", CPU, torch.float32)).name == "reference"
    assert dispatch.select(dispatch.Inputs("soft_merge", CPU, torch.float32), "torch").name == "torch"  # argument wins


def test_forced_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of \['cuda', 'triton', 'torch', 'reference'\], got 'flash'"):
        dispatch.select(dispatch.Inputs("hsda", CPU, torch.float32), "flash")
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="backend='torch' cannot run hsda on cuda.*CUDA is not available"):
            dispatch.select(dispatch.Inputs("hsda", CUDA, torch.float32), "torch")
        monkeypatch.setenv(dispatch.ENV_VAR, "torch")
        with pytest.raises(NotImplementedError, match="VIDKERN_BACKEND='torch' cannot run"):
            dispatch.select(dispatch.Inputs("hsda", CUDA, torch.float32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="lists reasons only when no backend can run")
def test_no_capable_backend_lists_every_reason():
    with pytest.raises(NotImplementedError, match=r"no vidkern backend can run hsda on cuda.*\n  cuda: .*does not implement hsda.*\n  triton: .*\n  torch: .*\n  reference: "):
        dispatch.select(dispatch.Inputs("hsda", CUDA, torch.float32))


def test_env_var_reaches_the_ops(monkeypatch):
    calls = []
    real = dispatch.select

    def spy(inputs, backend=None):
        chosen = real(inputs, backend)
        calls.append(chosen.name)
        return chosen
    monkeypatch.setattr(dispatch, "select", spy)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    x = torch.randn(1, 4, 3)
    vidkern.feature_summary(x)
    monkeypatch.delenv(dispatch.ENV_VAR)
    vidkern.feature_summary(x)
    assert calls == ["torch", "reference"]      # automatic on CPU: the reference (RULES)


def test_info_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "vidkern.info"], capture_output=True, text=True, check=True).stdout
    assert f"vidkern {vidkern.__version__}" in out and f"torch {torch.__version__}" in out
    assert "torch      available" in out and "reference  available" in out
    assert "triton     available" in out and "cuda" in out


def test_kernels_package_lives_under_vidkern():
    import importlib.util
    assert importlib.util.find_spec("vidkern.kernels") is not None


def test_soft_merge_prefers_triton_over_the_simt_cuda_kernels(monkeypatch):
    """On a GPU soft_merge and orthogonal_select go to Triton's kernels before the cuda backend (first in
    priority for every other op); asked for by name, or without Triton, cuda runs it. The rule is
    dispatch's (PREFERENCES), not the backend's: cuda itself has no reason to decline."""
    cuda_backend, triton_backend = dispatch.get("cuda"), dispatch.get("triton")
    assert dispatch.order("soft_merge") == ["triton", "cuda", "torch", "reference"]
    assert dispatch.order("hsda") == dispatch.names()
    capable = {"cuda": [], "triton": []}
    for name, be in (("cuda", cuda_backend), ("triton", triton_backend)):
        monkeypatch.setattr(be, "not_supported_reasons", lambda inputs, name=name: capable[name])
    assert dispatch.select(dispatch.Inputs("soft_merge", CUDA, torch.bfloat16)) is triton_backend
    assert dispatch.select(dispatch.Inputs("group_mean", CUDA, torch.bfloat16)) is cuda_backend   # no preference
    assert dispatch.select(dispatch.Inputs("orthogonal_select", CUDA, torch.bfloat16)) is triton_backend
    assert dispatch.select(dispatch.Inputs("soft_merge", CUDA, torch.bfloat16), "cuda") is cuda_backend
    capable["triton"] = ["triton missing"]
    assert dispatch.select(dispatch.Inputs("soft_merge", CUDA, torch.bfloat16)) is cuda_backend


def test_register_checks_the_op_interface():
    """A backend whose methods do not match the declared interface is refused at registration,
    naming each difference; every registered backend matches."""
    class Broken(dispatch.Backend):
        name = "broken"
        ops = frozenset({"team_gate", "feature_summary", "group_mean"})

        def team_gate_forward(self, x, h):
            return x, x

        def team_gate_backward(self, grad_y, x, h, tok_lse, s):   # an old, wrong signature
            return x, h

    with pytest.raises(TypeError, match=r"backend 'broken' does not implement the op interface.*"
                       r"feature_summary: no method feature_summary_forward\(x\).*"
                       r"group_mean: no method group_mean.*"
                       r"team_gate: team_gate_backward\(grad_y, x, h, tok_lse, s\) must take \(grad_y, x, h, s\)"):
        dispatch.register(Broken(), priority=50)
    assert "broken" not in dispatch.names()
    for name in dispatch.names():
        assert dispatch.interface_errors(dispatch.get(name)) == []
    assert dispatch.interface("hsda") == {
        "hsda_forward": ["q", "k", "v", "grid", "pattern", "num_global_heads", "scale"],
        "hsda_backward": ["grad_out", "q", "k", "v", "out", "lse", "grid", "pattern", "num_global_heads", "scale"]}
    with pytest.raises(ValueError, match="op must be one of"):
        dispatch.Inputs("flash", CPU)


def test_info_prints_the_override_value_and_says_where_each_backend_runs():
    import os
    env = dict(os.environ, VIDKERN_BACKEND="reference")
    out = subprocess.run([sys.executable, "-m", "vidkern.info"], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert "backend override: VIDKERN_BACKEND='reference'" in out, out
    assert "$VIDKERN_BACKEND" not in out
    if not torch.cuda.is_available():
        # Without a GPU (and without the test-only emulator) the CUDA kernels cannot run here.
        cuda_line = next(line for line in out.splitlines() if line.startswith("  cuda "))
        assert "available on" not in cuda_line, cuda_line
        assert "torch      available on cpu" in out
    env["VIDKERN_BACKEND"] = "flash"
    out = subprocess.run([sys.executable, "-m", "vidkern.info"], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert "VIDKERN_BACKEND='flash' is not one of" in out


def test_extension_error_tells_not_built_from_broken(monkeypatch):
    import importlib.util

    from vidkern.backends import cuda
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vidkern._C" else real(name, *a))
    cuda.extension_error.cache_clear()
    try:
        assert "is not built" in cuda.extension_error() and "reinstall" not in cuda.extension_error()
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vidkern._C" else real(name, *a))
        monkeypatch.setitem(sys.modules, "vidkern._C", None)      # importing it now raises ImportError
        monkeypatch.delattr(vidkern, "_C", raising=False)
        cuda.extension_error.cache_clear()
        assert "is built but does not load" in cuda.extension_error()
    finally:
        monkeypatch.undo()
        cuda.extension_error.cache_clear()
