"""What a new user hits first (issue 21, section 2): each case here failed before its fix."""
import inspect
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import vidkern
from vidkern import models
from vidkern.nn import TokenGroupInteraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kw)


def test_submodules_are_attributes_of_the_package():
    """The README's timm snippet: ``import vidkern; vidkern.nn.HSDAttention``."""
    run = _python("-c", "import vidkern; print(vidkern.nn.HSDAttention.__name__, vidkern.models.list_presets()[0])")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["HSDAttention", "far_b"]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        vidkern.nope


@pytest.mark.parametrize("strategy", ["fused", "split", "views"])
@pytest.mark.parametrize("shape", [(1, 0, 32, 32), (0, 2, 32, 32)], ids=["H=0", "B=0"])
def test_hsda_with_no_heads_or_no_batch_returns_empty(shape, strategy):
    q = torch.randn(shape, requires_grad=True)
    order = "grouped" if strategy == "views" else "natural"
    out = vidkern.hsda(q, q, q, (2, 4, 4), 0, strategy=strategy, token_order=order)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape


def test_integer_dtype_checks_name_the_argument():
    x = torch.randn(2, 20, 8)
    for bad in (torch.tensor([1 + 0j, 2 + 0j]), torch.tensor([1.0, 2.0]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match=f"start must have an integer dtype, got {bad.dtype}"):
            vidkern.orthogonal_select(x, 4, bad)


def test_numpy_and_tensor_integers_are_ints():
    q = torch.randn(1, 4, 32, 32)
    want = vidkern.hsda(q, q, q, (2, 4, 4), num_global_heads=1)
    for grid, hg in (((np.int64(2), np.int32(4), 4), np.int64(1)), ((torch.tensor(2), 4, 4), torch.tensor(1))):
        torch.testing.assert_close(vidkern.hsda(q, q, q, grid, num_global_heads=hg), want, rtol=0, atol=0)
    for bad in (True, np.True_, torch.tensor(True), 1.0, torch.tensor([1])):
        with pytest.raises(TypeError, match="num_global_heads must be an int"):
            vidkern.hsda(q, q, q, (2, 4, 4), num_global_heads=bad)
    with pytest.raises(TypeError, match=r"grid must be a tuple of three ints"):
        vidkern.hsda(q, q, q, (2.0, 4, 4))


def _ops(backend, dtype=None):
    """Each differentiable op as ``f(tensor) -> tensor`` of one float64/float32 input."""
    dtype = dtype or (torch.float32 if backend == "triton" else torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 32, dtype=dtype, generator=g)
    h = torch.randn(2, 32, dtype=dtype, generator=g)
    u = torch.nn.functional.normalize(torch.randn(2, 12, 32, dtype=dtype, generator=g), dim=-1)
    idx = torch.tensor([[0, 3, 7], [4, 5, 11]])
    q = torch.randn(1, 2, 32, 32, dtype=dtype, generator=g)
    return {
        "feature_summary": (x, lambda t: vidkern.feature_summary(t, backend=backend)),
        "team_gate": (x, lambda t: vidkern.team_gate(t, h, backend=backend)),
        "soft_merge": (x, lambda t: torch.cat(vidkern.soft_merge(u, idx, t, t, backend=backend), -1)),
        "hsda": (q, lambda t: vidkern.hsda(t, t, t, (2, 4, 4), backend=backend)),
        "hsda default": (q, lambda t: vidkern.hsda(t, t, t, (2, 4, 4))),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_func_grad_matches_autograd(backend):
    """torch.func.grad failed on every custom op ("must override the setup_context")."""
    for name, (x, f) in _ops(backend).items():
        got = torch.func.grad(lambda t: f(t).square().sum())(x)
        t = x.clone().requires_grad_()
        f(t).square().sum().backward()
        torch.testing.assert_close(got, t.grad, msg=lambda m: f"{name}: {m}")
        with pytest.raises(NotImplementedError, match="second-order gradients"):
            torch.func.grad(lambda t: torch.func.grad(lambda s: f(s).square().sum())(t).sum())(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_double_backward_raises_the_documented_error(dtype):
    """The default hsda (SDPA for the global heads) raised torch's "derivative ... not implemented"."""
    for name, (x, f) in _ops("torch", dtype).items():
        t = x.clone().requires_grad_()
        with pytest.raises(NotImplementedError, match="second-order gradients"):
            g, = torch.autograd.grad(f(t).square().sum(), t, create_graph=True)
            g.sum().backward()
    q = torch.randn(1, 2, 32, 32, dtype=torch.float64, requires_grad=True)   # the reference supports it
    g, = torch.autograd.grad(vidkern.hsda(q, q, q, (2, 4, 4), backend="reference").square().sum(), q, create_graph=True)
    g.sum().backward()


@pytest.mark.parametrize("argv, message", [
    (["vidkern.flops", "foo"], "name must be one of"),
    (["vidkern.flops", "far_s", "depth=abc"], "depth"),
    (["vidkern.work", "hsda", "B=abc"], "B must be a non-negative int, got B='abc'"),
    (["vidkern.work", "hsda", "grid=2,x,4"], "grid must be three ints"),
    (["vidkern.selftest", "--backend", "nope"], "invalid choice: 'nope'"),
])
def test_command_line_errors_are_messages_not_tracebacks(argv, message):
    run = _python("-m", *argv)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_info_help_is_help():
    run = _python("-m", "vidkern.info", "--help")
    assert run.returncode == 0 and run.stdout.startswith("usage: python -m vidkern.info"), run.stdout
    assert "dispatch rules" not in run.stdout


def test_compiling_a_model_prints_no_dynamo_warnings():
    """Each compile printed 2-3 dynamo warnings about ``functools.lru_cache`` (a fresh process:
    dynamo warns once per process)."""
    code = ("import torch\nfrom vidkern import models\n"
            "model = models.create('far_s', embed_dim=64, depth=2, num_heads=2, num_frames=4, img_size=64)\n"
            "x = torch.randn(1, 3, 4, 64, 64)\nmodel(x)\n"     # an eager warm-up fills vidkern's caches
            "torch.compile(model, fullgraph=True)(x)\nprint('compiled')")
    run = _python("-c", code)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr
    assert "lru_cache" not in run.stderr and "UserWarning" not in run.stderr, run.stderr


def test_readme_states_the_signatures():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for fn in (vidkern.hsda, vidkern.sparse_dense_attention, vidkern.group_mean, vidkern.feature_summary,
               vidkern.team_gate, vidkern.select_meta_tokens, vidkern.orthogonal_select, vidkern.soft_merge):
        listed = re.search(rf"`{fn.__name__}\(([^`]*)\)`", readme)
        assert listed, fn.__name__
        params = [p.split("=")[0].strip() for p in listed.group(1).split(",")]
        assert params == list(inspect.signature(fn).parameters), (fn.__name__, params)


def test_the_small_asks():
    assert models.list_presets() == sorted(models.PRESETS)
    assert os.path.isfile(os.path.join(os.path.dirname(vidkern.__file__), "py.typed"))
    assert "num_groups=6, grid=(2, 3, 4)" in repr(TokenGroupInteraction(48, (2, 3, 4)))
    x = torch.randn(1, 2 * 3 * 4 + 1, 48)
    with pytest.raises(ValueError, match="a CLS token"):
        vidkern.group_mean(x, (2, 3, 4))


def test_fp32_selection_leaves_the_tf32_setting_alone(cuda_kernel_device):
    """The CUDA selection toggled the process-global TF32 flag for its Gram product (a race with
    other threads' matmuls); it only reads it now, and picks as the reference does either way."""
    x = torch.randn(2, 40, 16, device=cuda_kernel_device)
    start = torch.tensor([0, 5], device=cuda_kernel_device)
    want = vidkern.orthogonal_select(x, 8, start, backend="reference")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for allowed in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allowed
            assert torch.equal(vidkern.orthogonal_select(x, 8, start, backend="cuda"), want)
            assert torch.backends.cuda.matmul.allow_tf32 is allowed
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
