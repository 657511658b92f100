"""The Triton TEAM kernels (feature_summary, team_gate) against the float64 reference.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
import pytest
import torch

import vidkern
from vidkern import dispatch, reference as R
from tolerance import check_against_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
reasons = dispatch.get("triton").reasons("team_gate", torch.device(DEVICE), torch.float32, forced=True)
pytestmark = pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))

SHAPES = [(2, 37, 24), (1, 1, 5), (3, 98, 64), (2, 50, 384), (1, 9, 1024)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_team_ops_match_reference(shape, dtype, poison):
    x, h = (torch.randn(shape) * 2).to(DEVICE), torch.randn(shape[0], shape[2]).to(DEVICE)
    check_against_reference("triton feature_summary", lambda a: vidkern.feature_summary(a, backend="triton"),
                            R.feature_summary, [x], dtype)
    check_against_reference("triton team_gate", lambda a, b: vidkern.team_gate(a, b, backend="triton"),
                            R.team_gate, [x, h], dtype)


def test_strided_inputs_and_stride0_grads():
    x = torch.randn(2, 24, 40).to(DEVICE).transpose(1, 2).requires_grad_()     # (B, N, D), channels-first
    h = torch.randn(24, 2).to(DEVICE).t().requires_grad_()
    vidkern.team_gate(x, h, backend="triton").sum().backward()
    vidkern.feature_summary(x, backend="triton").sum().backward()
    xr, hr = x.detach().double().requires_grad_(), h.detach().double().requires_grad_()
    (R.team_gate(xr, hr).sum() + R.feature_summary(xr).sum()).backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-5, atol=1e-5)


def test_gate_gradient_is_reproducible():
    """dh comes from per-block partial sums reduced in a fixed order: bitwise equal run to run."""
    x = torch.randn(2, 300, 64).to(DEVICE).requires_grad_()
    h = torch.randn(2, 64).to(DEVICE).requires_grad_()
    g = torch.randn(2, 300, 64).to(DEVICE)
    first = torch.autograd.grad(vidkern.team_gate(x, h, backend="triton"), (x, h), g)
    second = torch.autograd.grad(vidkern.team_gate(x, h, backend="triton"), (x, h), g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_channels_over_1024_fall_back_with_a_reason():
    with pytest.raises(NotImplementedError, match="2048 channels > 1024"):
        vidkern.team_gate(torch.randn(1, 4, 2048).to(DEVICE), torch.randn(1, 2048).to(DEVICE), backend="triton")
