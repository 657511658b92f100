"""Every bad input of SPEC §5 raises a named TypeError/ValueError before any kernel runs."""
import math

import pytest
import torch

import vidkern


def qkv(b=1, h=2, n=12, d=8, dtype=torch.float32):
    return [torch.randn(b, h, n, d, dtype=dtype) for _ in range(3)]


def raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_attention_bad_inputs():
    q, k, v = qkv()
    raises(TypeError, "q must be a torch.Tensor", vidkern.hsda, q.tolist(), k, v, (1, 3, 4))
    raises(ValueError, r"q must have shape \(B, H, N, d\)", vidkern.hsda, q[0], k, v, (1, 3, 4))
    raises(ValueError, r"k must have q's shape .*\(1, 2, 12, 8\).*got \(1, 2, 11, 8\)", vidkern.hsda, q, k[:, :, :11], v, (1, 3, 4))
    raises(ValueError, r"N=12 must equal T\*Hp\*Wp = 1\*3\*5 = 15", vidkern.hsda, q, k, v, (1, 3, 5))
    raises(TypeError, "grid must be a tuple of three ints", vidkern.hsda, q, k, v, (3, 4))
    raises(TypeError, "grid must be a tuple of three ints", vidkern.hsda, q, k, v, (1.0, 3, 4))
    raises(ValueError, "grid must have positive entries", vidkern.hsda, q, k, v, (-1, -3, 4))
    raises(ValueError, "grid .* is required unless every head is global", vidkern.hsda, q, k, v, None)
    raises(TypeError, "v must have q's dtype torch.float32, got torch.float16", vidkern.hsda, q, k, v.half(), (1, 3, 4))
    raises(TypeError, "q must be float16, bfloat16, float32 or float64, got torch.int64", vidkern.hsda,
           q.long(), k.long(), v.long(), (1, 3, 4))
    raises(ValueError, "k must be on q's device cpu, got meta", vidkern.hsda, q, k.to("meta"), v, (1, 3, 4))
    raises(ValueError, r"num_global_heads must be in \[0, 2\], got 3", vidkern.hsda, q, k, v, (1, 3, 4), 3)
    raises(TypeError, "num_global_heads must be an int", vidkern.hsda, q, k, v, (1, 3, 4), 1.0)
    raises(ValueError, "pattern must be one of", vidkern.hsda, q, k, v, (1, 3, 4), pattern="diagonal")
    raises(ValueError, r"pattern tensor must have shape \(N,\) = \(12,\)", vidkern.hsda, q, k, v, (1, 3, 4),
           pattern=torch.zeros(11, dtype=torch.long))
    raises(TypeError, "pattern tensor must have an integer dtype", vidkern.hsda, q, k, v, (1, 3, 4),
           pattern=torch.zeros(12))
    raises(ValueError, "non-negative group ids", vidkern.hsda, q, k, v, (1, 3, 4), pattern=-torch.ones(12, dtype=torch.long))
    raises(ValueError, "scale must be a finite float, got nan", vidkern.hsda, q, k, v, (1, 3, 4), scale=math.nan)
    raises(ValueError, "q must have at least one token", vidkern.hsda, *qkv(n=0), None, 2)


def test_team_bad_inputs():
    x, h = torch.randn(2, 5, 4), torch.randn(2, 4)
    raises(ValueError, r"x must have shape \(B, N, D\)", vidkern.feature_summary, x[0])
    raises(TypeError, "x must be float16", vidkern.feature_summary, x.int())
    raises(ValueError, r"h must have shape \(B, D\) = \(2, 4\), got \(2, 5\)", vidkern.team_gate, x, torch.randn(2, 5))
    raises(TypeError, "h must have x's dtype", vidkern.team_gate, x, h.double())
    raises(ValueError, "h must be on x's device", vidkern.team_gate, x, h.to("meta"))


def test_selection_bad_inputs():
    x = torch.randn(2, 10, 4)
    raises(ValueError, r"num_out must be in \[1, 10\], got 11", vidkern.select_meta_tokens, x, 11)
    raises(ValueError, r"num_out must be in \[1, 10\], got 0", vidkern.select_meta_tokens, x, 0)
    raises(TypeError, "num_out must be an int", vidkern.select_meta_tokens, x, 2.5)
    raises(ValueError, r"scores must have shape \(B, L\) = \(2, 10\)", vidkern.select_meta_tokens, x, 3, torch.randn(2, 9))
    raises(ValueError, r"start must hold indices in \[0, 10\)", vidkern.select_meta_tokens, x, 3, start=torch.tensor([0, 10]))
    raises(ValueError, r"start must have shape \(B,\) = \(2,\)", vidkern.orthogonal_select, x, 3, torch.tensor([0]))
    raises(TypeError, "start must have an integer dtype", vidkern.orthogonal_select, x, 3, torch.tensor([0.0, 1.0]))
    raises(ValueError, "alpha must be >= 1", vidkern.select_meta_tokens, x, 3, torch.randn(2, 10), alpha=0.5)
    raises(ValueError, "alpha must be a finite float", vidkern.select_meta_tokens, x, 3, torch.randn(2, 10), alpha=math.inf)
    raises(ValueError, r"k must be in \[1, 10\], got 12", vidkern.orthogonal_select, x, 12, torch.tensor([0, 1]))
    raises(TypeError, r"start must be an int tensor of shape \(B,\)", vidkern.orthogonal_select, x, 3, None)


def test_merge_bad_inputs():
    u, x, e = torch.randn(2, 10, 3), torch.randn(2, 10, 4), torch.randn(1, 10, 4)
    idx = torch.tensor([[0, 5], [1, 2]])
    raises(ValueError, "tau must be a finite positive float, got inf", vidkern.soft_merge, u, idx, x, e, math.inf)
    raises(ValueError, "tau must be a finite positive float, got nan", vidkern.soft_merge, u, idx, x, e, math.nan)
    raises(ValueError, "tau must be a finite positive float, got 0.0", vidkern.soft_merge, u, idx, x, e, 0.0)
    raises(TypeError, "idx must be int64", vidkern.soft_merge, u, idx.int(), x, e)
    raises(ValueError, r"idx must hold token indices in \[0, 10\)", vidkern.soft_merge, u, idx + 9, x, e)
    raises(ValueError, r"L' <= L=10, got L'=11", vidkern.soft_merge, u, torch.zeros(2, 11, dtype=torch.long), x, e)
    raises(ValueError, r"1 <= L' .* got L'=0", vidkern.soft_merge, u, torch.zeros(2, 0, dtype=torch.long), x, e)
    raises(ValueError, r"e must have shape \(B, L, D\) or \(1, L, D\)", vidkern.soft_merge, u, idx, x, torch.randn(2, 10, 5))
    raises(ValueError, r"u must have shape \(B, L, Du\)", vidkern.soft_merge, u[:, :9], idx, x, e)
    raises(TypeError, "e must have x's dtype", vidkern.soft_merge, u, idx, x, e.double())
    raises(ValueError, "u must be on x's device", vidkern.soft_merge, u.to("meta"), idx, x, e)


def test_group_mean_bad_inputs():
    x = torch.randn(2, 12, 4)
    raises(ValueError, "N=12 must equal", vidkern.group_mean, x, (1, 3, 5))
    raises(ValueError, r"must use every group id .* missing \[1\]", vidkern.group_mean, x, (1, 3, 4),
           torch.tensor([0, 2] * 6))


def test_errors_come_before_any_backend_runs(monkeypatch):
    """A bad call never reaches dispatch (so no kernel can launch)."""
    from vidkern import dispatch

    def boom(*a, **k):
        raise AssertionError("dispatch reached with bad input")
    monkeypatch.setattr(dispatch, "select", boom)
    q, k, v = qkv()
    with pytest.raises(ValueError):
        vidkern.hsda(q, k, v, (1, 3, 5))
    with pytest.raises(ValueError):
        vidkern.soft_merge(torch.randn(1, 4, 2), torch.tensor([[0]]), torch.randn(1, 4, 2), torch.randn(1, 4, 2), math.nan)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_batches_return_empty_outputs(backend):
    x = torch.randn(0, 6, 4, requires_grad=True)
    assert vidkern.feature_summary(x, backend=backend).shape == (0, 4)
    assert vidkern.team_gate(x, torch.randn(0, 4), backend=backend).shape == (0, 6, 4)
    assert vidkern.select_meta_tokens(x, 3, backend=backend).shape == (0, 3)
    a, p = vidkern.soft_merge(x, torch.zeros(0, 2, dtype=torch.long), x, torch.randn(1, 6, 4), backend=backend)
    assert a.shape == p.shape == (0, 2, 4)
    (a.sum() + p.sum()).backward()
    assert x.grad.shape == x.shape
    assert vidkern.group_mean(x, (1, 2, 3), backend=backend).shape == (0, 2, 4)


def test_team_gate_needs_a_gate():
    raises(TypeError, r"h must be a torch.Tensor of shape \(B, D\), got NoneType", vidkern.team_gate,
           torch.randn(2, 5, 4), None)


def test_group_mean_num_groups_is_validated():
    x = torch.randn(2, 12, 4)
    raises(ValueError, r"num_groups=3 must equal the 'checkerboard' pattern's group count .*: 2", vidkern.group_mean,
           x, (1, 3, 4), num_groups=3)
    raises(ValueError, r"num_groups must be in \[1, 12\], got 0", vidkern.group_mean, x, (1, 3, 4), num_groups=0)
    raises(TypeError, "num_groups must be an int", vidkern.group_mean, x, (1, 3, 4), num_groups=2.0)
    raises(ValueError, r"num_groups=4 must equal max id \+ 1 = 3", vidkern.group_mean, x, (1, 3, 4),
           torch.tensor([0, 1, 2] * 4), num_groups=4)
    assert torch.isfinite(vidkern.group_mean(x, (1, 3, 4), num_groups=2)).all()


def test_env_var_typo_names_the_variable(monkeypatch):
    monkeypatch.setenv("VIDKERN_BACKEND", "refrence")
    raises(ValueError, r"\$VIDKERN_BACKEND must be one of \['cuda', 'triton', 'torch', 'reference'\], got 'refrence'",
           vidkern.feature_summary, torch.randn(1, 4, 3))


def _second_order(fn, inputs):
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(sum(o.square().sum() for o in out), inputs, create_graph=True)
    return torch.autograd.grad(sum(g.sum() for g in grads), inputs, allow_unused=True)


def _double_backward_cases():
    q, k, v = (t.requires_grad_() for t in qkv(dtype=torch.float64))
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(2, 6, 4, dtype=torch.float64), dim=-1).requires_grad_()
    idx = torch.tensor([[0, 3], [1, 5]])
    return {
        "hsda": (lambda q, k, v, backend: vidkern.hsda(q, k, v, (1, 3, 4), backend=backend), (q, k, v)),
        "feature_summary": (lambda x, backend: vidkern.feature_summary(x, backend=backend), (x,)),
        "team_gate": (lambda x, h, backend: vidkern.team_gate(x, h, backend=backend), (x, h)),
        "soft_merge": (lambda u, x, backend: vidkern.soft_merge(u, idx, x, x, backend=backend), (u, x)),
    }


@pytest.mark.parametrize("op", ["hsda", "feature_summary", "team_gate", "soft_merge"])
def test_double_backward_is_refused_by_name_or_works(op):
    """SPEC §5: second-order gradients work (reference) or raise NotImplementedError saying so."""
    fn, inputs = _double_backward_cases()[op]
    with pytest.raises(NotImplementedError, match=f"vidkern.{op}: second-order gradients .* not implemented"):
        _second_order(lambda *t: fn(*t, backend="torch"), inputs)
    assert all(g is None or torch.isfinite(g).all() for g in _second_order(lambda *t: fn(*t, backend="reference"), inputs))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_leaves_float64_alone(backend):
    """As torch's own autocast: float64 is not a lower-precision-eligible dtype."""
    q, k, v = qkv(dtype=torch.float64)
    x, h = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    u, idx = torch.nn.functional.normalize(torch.randn(2, 6, 4, dtype=torch.float64), dim=-1), torch.tensor([[0, 3], [1, 5]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vidkern.hsda(q, k, v, (1, 3, 4), backend=backend).dtype == torch.float64
        assert vidkern.team_gate(x, h, backend=backend).dtype == torch.float64
        assert all(t.dtype == torch.float64 for t in vidkern.soft_merge(u, idx, x, x, backend=backend))
        assert vidkern.hsda(*(t.float() for t in (q, k, v)), (1, 3, 4), backend=backend).dtype == torch.bfloat16


def test_reference_does_not_overflow_in_float16():
    """The reference computes fp16 products in fp32 inside (as SDPA's math path), so large scores
    that fit the output do not turn into inf/NaN."""
    q, k, v = (t * 40 for t in qkv(d=64, dtype=torch.float64))      # |q.k| ~ 1e5 > fp16's 65504
    truth = vidkern.hsda(q, k, v, (1, 3, 4), backend="reference")
    half = vidkern.hsda(q.half(), k.half(), v.half(), (1, 3, 4), backend="reference")
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.double(), truth, rtol=2e-2, atol=0.05 * truth.abs().max().item())
    u = torch.nn.functional.normalize(torch.randn(2, 20, 8, dtype=torch.float64), dim=-1)
    x, idx = torch.randn(2, 20, 8, dtype=torch.float64), torch.tensor([[0, 3, 7], [1, 5, 19]])
    truth = vidkern.soft_merge(u, idx, x, x, tau=1e-5, backend="reference")
    half = vidkern.soft_merge(u.half(), idx, x.half(), x.half(), tau=1e-5, backend="reference")
    for a, t in zip(half, truth):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), t, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "cuda"])
def test_soft_merge_refuses_repeated_meta_tokens(backend, cuda_kernel_device):
    """SPEC §3.2: idx holds distinct tokens per row. A repeat lost updates in the GPU kernels
    (concurrent read-modify-writes of one meta row), which the CPU runs cannot show: refused,
    eagerly and when compiled, before any kernel."""
    import vidkern
    if backend == "cuda" and cuda_kernel_device.type != "cpu":
        pytest.skip("emulator case; on a GPU the check is a device-side assert")
    u = torch.nn.functional.normalize(torch.randn(2, 12, 8), dim=-1)
    x = torch.randn(2, 12, 8)
    good = torch.tensor([[0, 3, 7], [4, 5, 11]])
    vidkern.soft_merge(u, good, x, x, backend=backend)
    for bad, row in (([[0, 3, 3], [4, 5, 11]], 0), ([[0, 3, 7], [11, 5, 11]], 1)):
        with pytest.raises(ValueError, match=rf"idx must hold distinct token indices in each row, got \[\d+\] "
                                             rf"more than once in row {row}"):
            vidkern.soft_merge(u, torch.tensor(bad), x, x, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(lambda idx: vidkern.soft_merge(u, idx, x, x, backend=backend), fullgraph=True)
    compiled(good)
    with pytest.raises((ValueError, RuntimeError), match="idx must hold distinct token indices in each row"):
        compiled(torch.tensor([[0, 3, 3], [4, 5, 11]]))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "cuda"])
def test_negative_and_out_of_range_indices_are_refused_eagerly(backend, cuda_kernel_device):
    """Eager calls (the compiled path has its own tests): idx and start outside [0, L), negative
    included, raise the ValueError naming them before any kernel — on every backend."""
    import vidkern
    if backend == "cuda" and cuda_kernel_device.type != "cpu":
        pytest.skip("emulator case; on a GPU the check is a device-side assert")
    u = torch.nn.functional.normalize(torch.randn(2, 12, 8), dim=-1)
    x = torch.randn(2, 12, 8)
    for bad in (-1, -12, 12, 10**6):
        idx = torch.tensor([[0, 3, 7], [4, 5, 11]])
        idx[1, 0] = bad
        with pytest.raises(ValueError, match=r"idx must hold token indices in \[0, 12\)"):
            vidkern.soft_merge(u, idx, x, x, backend=backend)
        with pytest.raises(ValueError, match=r"start must hold indices in \[0, 12\)"):
            vidkern.orthogonal_select(x, 4, torch.tensor([0, bad]), backend=backend)
        with pytest.raises(ValueError, match=r"start must hold indices in \[0, 12\)"):
            vidkern.select_meta_tokens(x, 4, start=torch.tensor([bad, 1]), backend=backend)
