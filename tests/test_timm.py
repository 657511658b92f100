"""HSDAttention.from_attention on timm's attention and the README's in-place recipe on timm ViTs.

timm is in the "test" extra; without it these tests skip."""
import inspect

import pytest
import torch
from torch import nn

from vidkern.nn import HSDAttention

timm = pytest.importorskip("timm", reason="timm is in the 'test' extra (pip install -e '.[test]')")
from timm.layers import Attention, RmsNorm  # noqa: E402

DIM, HEADS, TOKENS = 32, 4, 9

#: Every constructor option of timm.layers.Attention that changes its weights or what it computes,
#: each converted exactly (checked against timm in float64, both timm attention paths).
CONVERTED = {
    "qkv_bias": dict(qkv_bias=True),
    "attn_head_dim": dict(attn_head_dim=12),
    "dim_out": dict(dim_out=40),
    "qk_norm": dict(qk_norm=True, norm_layer=nn.LayerNorm),
    "qk_norm_rms": dict(qk_norm=True, norm_layer=RmsNorm),
    "scale_norm": dict(scale_norm=True, norm_layer=nn.LayerNorm),
    "proj_bias": dict(proj_bias=False),
    "gated": dict(gated=True, qkv_bias=True),
    "proj_drop": dict(proj_drop=0.1),
    "all": dict(qkv_bias=True, attn_head_dim=12, dim_out=40, qk_norm=True, scale_norm=True, norm_layer=RmsNorm,
                proj_bias=False, gated=True, proj_drop=0.1),
}
#: Options refused with NotImplementedError naming the attribute.
REFUSED = {"attn_drop": (dict(attn_drop=0.1), "attn.attn_drop")}
#: Options that do not change the math: how timm builds the module, not what it computes.
NEUTRAL = {"dim", "num_heads", "norm_layer", "device", "dtype"}


def randomised(attn):
    """``attn`` in float64 eval mode, every parameter (norm weights too) random."""
    attn = attn.double().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
    return attn


def test_every_constructor_option_of_timm_attention_is_covered():
    options = set(inspect.signature(Attention.__init__).parameters) - {"self"}
    covered = NEUTRAL | set(REFUSED) | {k for kw in CONVERTED.values() for k in kw}
    assert options <= covered, f"timm's Attention has options these tests do not cover: {sorted(options - covered)}"


@pytest.mark.parametrize("fused", [True, False], ids=["fused_attn", "unfused"])
@pytest.mark.parametrize("option", sorted(CONVERTED))
def test_timm_attention_option_converts_exactly(option, fused):
    kw = CONVERTED[option]
    if not set(kw) <= set(inspect.signature(Attention.__init__).parameters):
        pytest.skip(f"this timm ({timm.__version__}) has no {sorted(set(kw))} option")
    attn = randomised(Attention(DIM, HEADS, **kw))
    attn.fused_attn = fused
    new = HSDAttention.from_attention(attn, num_global_heads=HEADS)
    assert not new.training and new.proj_drop.p == attn.proj_drop.p
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64)
    torch.testing.assert_close(new(x), attn(x))
    torch.testing.assert_close(new(x, attn_mask=None, is_causal=False), attn(x, attn_mask=None, is_causal=False))


@pytest.mark.parametrize("fused", [True, False], ids=["fused_attn", "unfused"])
def test_timm_scale_is_the_one_timm_uses(fused):
    """timm's fused path (SDPA without a scale) ignores attn.scale; the unfused path multiplies by it."""
    attn = randomised(Attention(DIM, HEADS))
    attn.fused_attn, attn.scale = fused, 0.7
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64)
    torch.testing.assert_close(HSDAttention.from_attention(attn, num_global_heads=HEADS)(x), attn(x))


def test_timm_attention_dropout_is_refused_by_name():
    kw, name = REFUSED["attn_drop"]
    with pytest.raises(NotImplementedError, match=name):
        HSDAttention.from_attention(Attention(DIM, HEADS, **kw), num_global_heads=HEADS)


def test_other_timm_attentions_are_refused_by_name():
    from timm.layers.attention import AttentionRope
    with pytest.raises(NotImplementedError, match=r"forward takes \['rope'\]"):
        HSDAttention.from_attention(AttentionRope(DIM, HEADS))
    with pytest.raises(TypeError, match="qkv"):                 # separate q/k/v projections
        HSDAttention.from_attention(AttentionRope(DIM, HEADS, qkv_fused=False))
    from timm.models.beit import Attention as BeitAttention
    with pytest.raises(NotImplementedError, match="relative_position_bias_table"):
        HSDAttention.from_attention(BeitAttention(DIM, HEADS, window_size=(3, 3)))
    extra = Attention(DIM, HEADS)
    extra.rel_bias = nn.Linear(2, 2)
    with pytest.raises(NotImplementedError, match=r"attn.rel_bias \(Linear\)"):
        HSDAttention.from_attention(extra)


def test_timm_call_signature_is_accepted_and_a_mask_is_refused_by_name():
    new = HSDAttention.from_attention(Attention(DIM, HEADS), num_global_heads=HEADS)
    x = torch.randn(2, TOKENS, DIM)
    assert new(x, attn_mask=None, is_causal=False).shape == x.shape
    with pytest.raises(NotImplementedError, match="attn_mask"):
        new(x, attn_mask=torch.zeros(TOKENS, TOKENS))
    with pytest.raises(NotImplementedError, match="is_causal"):
        new(x, is_causal=True)


def convert_in_place(model, **kw):
    """The README recipe: every block's attention replaced in place, weights kept."""
    for block in model.blocks:
        block.attn = HSDAttention.from_attention(block.attn, **kw)
    return model


def test_converted_timm_vit_with_cls_token_matches_the_original():
    """vit_tiny (CLS token, 12 blocks, 3 heads): all heads global -> the same network."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(images)
        got = convert_in_place(model, num_global_heads=model.blocks[0].attn.num_heads)(images)
    assert all(isinstance(b.attn, HSDAttention) for b in model.blocks)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_converted_timm_vit_on_a_grid_matches_then_trains_with_hsda():
    """No CLS token, average pooling: the tokens form a (1, 4, 4) grid, so the converted blocks
    can run HSDA proper; with every head global they reproduce the original."""
    from timm.models.vision_transformer import VisionTransformer
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5, class_token=False,
              global_pool="avg", qkv_bias=True)
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    model = VisionTransformer(**kw).eval()
    with torch.no_grad():
        want = model(images)
        got = convert_in_place(model, grid=(1, 4, 4), num_global_heads=4)(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    hsda = convert_in_place(VisionTransformer(**kw), grid=(1, 4, 4)).train()     # default: half the heads global
    assert hsda.blocks[0].attn.num_global_heads == 2
    out = hsda(images)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None for p in hsda.parameters() if p.requires_grad)
