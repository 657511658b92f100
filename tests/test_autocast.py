"""torch.autocast: vidkern's ops declare a policy (vidkern.ops._autocast) so that models run in
mixed precision the way the layers they replace do — matrix-product ops (hsda, soft_merge) in the
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
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
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
