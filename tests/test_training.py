"""Training behaviour: torch.autocast, gradient checkpointing and deterministic mode.

vidkern's ops declare an autocast policy (vidkern.ops._autocast) so that models run in mixed
precision the way the layers they replace do — matrix-product ops (hsda, soft_merge) in the
autocast dtype, the softmax-and-gate op (team_gate) in the widest input dtype."""
import pytest
import torch

import vidkern
from vidkern import models, reference as R

BF16 = torch.bfloat16


@pytest.mark.parametrize("name", ["videomae_s", "far_s", "team_s", "sttm_vit_s"])
def test_presets_train_under_cpu_bf16_autocast(name):
    model = models.create(name, num_frames=4, img_size=64, num_classes=5).eval()
    clip = torch.randn(2, 3, 4, 64, 64)
    with torch.autocast("cpu", dtype=BF16):
        logits = model(clip)
    assert logits.dtype == BF16
    logits.float().sum().backward()
    # (far_s: TGI's grouped Conv3d runs in fp32 on the CPU, around oneDNN's bf16 one, whose weight
    # gradients were non-finite in ~5-15% of calls; tests/test_modules.py checks that routing.)
    bad = [n for n, p in model.named_parameters() if p.requires_grad
           and not (p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())]
    assert not bad, f"missing, non-fp32 or non-finite gradients: {bad}"
    if name != "sttm_vit_s":   # (STTM's picks may differ between bf16 and fp32 features)
        with torch.no_grad():
            full = model(clip)
        assert (logits.float() - full).abs().max() <= 0.05 * full.abs().max() + 1e-2


def test_op_policies():
    b, n, d = 2, 16, 8
    x32, u16 = torch.randn(b, n, d), R.normalize(torch.randn(b, n, d)).to(BF16)
    idx = vidkern.select_meta_tokens(x32, 8)
    with pytest.raises(TypeError, match="u must have x's dtype"):
        vidkern.soft_merge(u16, idx, x32, x32)                      # outside autocast: an error, as documented
    with torch.autocast("cpu", dtype=BF16):
        a, p = vidkern.soft_merge(u16, idx, x32, x32)               # "lower": the autocast dtype
        y = vidkern.team_gate(x32, torch.randn(b, d).to(BF16))      # "widest": float32
        o = vidkern.hsda(torch.randn(1, 2, n, d), torch.randn(1, 2, n, d).to(BF16), torch.randn(1, 2, n, d),
                         (1, 4, 4))
    assert a.dtype == p.dtype == BF16 and y.dtype == torch.float32 and o.dtype == BF16


@pytest.mark.parametrize("name", ["far_s", "team_s", "sttm_vit_s"])
def test_gradient_checkpointing_gives_identical_gradients(name):
    """Training mode: STTM draws a random start and DropPath random masks; checkpointing restores
    the RNG state on recompute, so the gradients are bitwise those of the plain run."""
    model = models.create(name, num_frames=4, img_size=64, num_classes=5, drop_path_rate=0.1).train()
    clip = torch.randn(2, 3, 4, 64, 64)

    def grads(checkpointing):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(7)
        model(clip).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]
    plain, ckpt = grads(False), grads(True)
    assert len(plain) == len(ckpt) and all(torch.equal(a, b) for a, b in zip(plain, ckpt))


def _every_op(backend):
    """Forward and backward of every differentiable op on one backend: the outputs and input grads."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    x, h = torch.randn(2, 32, 16, requires_grad=True), torch.randn(2, 16, requires_grad=True)
    u = R.normalize(torch.randn(2, 32, 16)).requires_grad_()
    idx = vidkern.select_meta_tokens(x.detach(), 12, backend=backend)
    outs = (vidkern.hsda(q, k, v, (2, 4, 4), backend=backend), vidkern.feature_summary(x, backend=backend),
            vidkern.team_gate(x, h, backend=backend), *vidkern.soft_merge(u, idx, x, x, backend=backend))
    grads = torch.autograd.grad([o.sum() * (i + 1) for i, o in enumerate(outs)], (q, k, v, x, h, u))
    return (idx,) + outs + grads


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_deterministic_mode_runs_and_repeats_bitwise(backend):
    """Under torch.use_deterministic_algorithms(True) every op runs (none relies on an op torch
    would refuse) and repeats bit for bit."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _every_op(backend), _every_op(backend)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
