"""The CUDA C++ TEAM kernels (csrc/team.cu) against the float64 reference.

Without a GPU they run on the CPU through the emulator (csrc/emulate.h): the same source, one OS
thread per CUDA thread, real barriers and warp shuffles (tests/conftest.py: cuda_kernel_device)."""
import pytest
import torch

import vidkern
from vidkern import dispatch, reference as R
from vidkern.backends import cuda
from tolerance import check_against_reference

SHAPES = [(2, 37, 24), (1, 1, 5), (3, 98, 64), (2, 300, 64), (2, 50, 384), (1, 9, 1024)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def dev(cuda_kernel_device):
    return cuda_kernel_device


def summary(x):
    return vidkern.feature_summary(x, backend="cuda")


def gate(x, h):
    return vidkern.team_gate(x, h, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_team_ops_match_reference(shape, dtype, dev, poison):
    x, h = (torch.randn(shape) * 2).to(dev), torch.randn(shape[0], shape[2]).to(dev)
    check_against_reference("cuda feature_summary", summary, R.feature_summary, [x], dtype)
    check_against_reference("cuda team_gate", gate, R.team_gate, [x, h], dtype)


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 300])
def test_feature_summary_token_splits(splits, dev, poison):
    """The split-token path (partial states merged in order) equals the reference for any split
    count, including one token per split."""
    x = (torch.randn(2, 300, 40) * 3).to(dev)
    f, stats = cuda.kernels(dev).feature_summary_fwd(x, splits)
    truth = R.feature_summary(x.double())
    assert (f.double() - truth).abs().max() < 2e-6 * truth.abs().max()
    assert torch.equal(stats[:, 2], f) and torch.equal(stats[:, 0], x.amax(1))


@pytest.mark.parametrize("layout", ["transposed", "odd_channels", "misaligned", "fused_view"])
def test_unpacked_layouts(layout, dev):
    """Inputs the 16-byte packed path cannot read (channel stride != 1, D not a multiple of the
    pack, a base pointer off 16 bytes, row strides off the pack) take the scalar path, with
    identical semantics; stride-0 output gradients included."""
    b, n, d = 2, 45, 48
    if layout == "transposed":
        x = torch.randn(b, d, n).transpose(1, 2)
    elif layout == "odd_channels":
        x = torch.randn(b, n, d + 2)[..., :d + 1]
    elif layout == "misaligned":
        x = torch.randn(b, n, d + 1)[..., 1:]
    else:
        x = torch.randn(b, n, 3 * d + 4)[..., 4:4 + d]     # a slice of a wider (fused) projection
    x = x.to(dev).requires_grad_()
    h = torch.randn(x.shape[-1], b).to(dev).t().requires_grad_()
    gate(x, h).sum().backward()                                # sum(): stride-0 expanded gradient
    summary(x).sum().backward()
    xr, hr = x.detach().double().requires_grad_(), h.detach().double().requires_grad_()
    (R.team_gate(xr, hr).sum() + R.feature_summary(xr).sum()).backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-5, atol=1e-5)


def test_results_are_bitwise_reproducible(dev):
    """Fixed-order reductions and no float atomics: equal bits run to run (a race in a kernel —
    here, between the emulator's threads — would show up as a difference)."""
    x = torch.randn(2, 300, 64).to(dev).requires_grad_()
    h = torch.randn(2, 64).to(dev).requires_grad_()
    gy, gf = torch.randn(2, 300, 64).to(dev), torch.randn(2, 64).to(dev)

    def run():
        return (torch.autograd.grad(gate(x, h), (x, h), gy) + torch.autograd.grad(summary(x), (x,), gf)
                + (cuda.kernels(dev).feature_summary_fwd(x.detach(), 3)[0],))
    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_kernels_check_their_inputs(dev):
    k = cuda.kernels(dev)
    with pytest.raises(RuntimeError, match=r"x must be \(B, N, D\)"):
        k.team_gate_fwd(torch.randn(4, 8).to(dev), torch.randn(4, 8).to(dev))
    with pytest.raises(RuntimeError, match="h must have shape"):
        k.team_gate_fwd(torch.randn(2, 4, 8).to(dev), torch.randn(2, 7).to(dev))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        k.feature_summary_fwd(torch.randn(2, 4, 8, dtype=torch.float64).to(dev))
    with pytest.raises(RuntimeError, match="at most 1024"):
        k.feature_summary_fwd(torch.randn(1, 2, 1025).to(dev))


def test_dispatch_limits(dev):
    with pytest.raises(NotImplementedError, match="2048 channels > 1024"):
        gate(torch.randn(1, 4, 2048).to(dev), torch.randn(1, 2048).to(dev))
    # float64 never goes to the cuda backend
    assert dispatch.select(dispatch.Inputs("team_gate", torch.device(dev), torch.float64)).name != "cuda"
    if dev.type == "cpu":   # the emulator never runs unless asked for by name (CPU TEAM: the reference)
        assert dispatch.select(dispatch.Inputs("team_gate", dev, torch.float32)).name == "reference"
        assert "asked for" in " ".join(dispatch.get("cuda").reasons("team_gate", dev, torch.float32))


def test_empty_batch(dev):
    x, h = torch.randn(0, 5, 8).to(dev), torch.randn(0, 8).to(dev)
    assert gate(x, h).shape == (0, 5, 8) and summary(x).shape == (0, 8)
