"""vidkern.models.from_transformers: Hugging Face VideoMAE -> vidkern ViT (extra "hf")."""
import pytest
import torch

from vidkern import models
from vidkern.nn import HSDAttention

transformers = pytest.importorskip("transformers", reason="transformers is the optional extra 'hf'")

HF_SMALL = dict(image_size=64, num_frames=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=96, num_labels=5)


def hf_model(**kw):
    return transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(**{**HF_SMALL, **kw})).eval()


def logits(model, clip, hf=False):
    with torch.no_grad():
        return model(pixel_values=clip.transpose(1, 2)).logits if hf else model(clip)


def test_converted_model_reproduces_the_logits():
    hf = hf_model()
    vk = models.from_transformers(hf).eval()
    assert vk.load_report.clean and len(vk.load_report.loaded) == len(vk.state_dict())
    clip = torch.randn(2, 3, 4, 64, 64)
    ref = logits(hf, clip, hf=True)
    assert (logits(vk, clip) - ref).abs().max() <= 1e-5 * ref.abs().max()
    clip = clip.double()
    ref = logits(hf.double(), clip, hf=True)
    assert (logits(vk.double(), clip) - ref).abs().max() <= 1e-12 * ref.abs().max()   # exact conversion


def test_hsda_with_all_heads_global_equals_hf_attention():
    hf = hf_model()
    vk = models.from_transformers(hf)
    attn = HSDAttention(48, 2, grid=vk.cfg.grid, num_global_heads=2, qv_bias=True)
    attn.load_state_dict(vk.blocks[0].attn.state_dict())
    x = torch.randn(2, vk.cfg.grid[0] * vk.cfg.grid[1] * vk.cfg.grid[2], 48, dtype=torch.float64)
    with torch.no_grad():
        want = hf.double().videomae.encoder.layer[0].attention(x)
        got = attn.double()(x)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_overrides_build_on_the_pretrained_weights():
    hf = hf_model()
    clip = torch.randn(1, 3, 4, 64, 64)
    tgi = models.from_transformers(hf, token_group_interaction=True).eval()
    # TGI's last projection starts at zero: the converted network starts as the pretrained one
    assert (logits(tgi, clip) - logits(hf, clip, hf=True)).abs().max() <= 1e-5
    for overrides in (dict(attention="hsda", token_group_interaction=True, classifier="group_mean"),
                      dict(team=True, team_ratios={"early": (0.25, 0.5, 0.75), "late": (0.25, 0.5, 0.75)},
                           team_blocks=(1,)),
                      dict(sttm=True, sttm_blocks=(1, 2))):
        vk = models.from_transformers(hf_model(num_hidden_layers=3) if overrides.get("sttm") else hf, **overrides)
        report = vk.load_report
        assert not report.unexpected
        assert all(f"blocks.{i}.attn.qkv.weight" in report.loaded for i in range(vk.cfg.depth))
        new = report.missing + [m[0] for m in report.mismatched]      # only the modules the overrides add
        assert new and all(any(s in k for s in (".tgi.", ".team.", ".norm3.", "sttm_", "classifier.head.")) for k in new), new
        assert vk.eval()(clip).shape == (1, 5)


def test_only_videomae_models_convert():
    with pytest.raises(TypeError, match="VideoMAE"):
        models.from_transformers(transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)))
    with pytest.raises(NotImplementedError, match="use_mean_pooling"):
        models.from_transformers(hf_model(use_mean_pooling=False))


MISMATCHED_OVERRIDES = [   # (override, value, the pretrained value from HF_SMALL's config)
    ("embed_dim", 96, 48), ("depth", 4, 2), ("num_heads", 4, 2), ("mlp_ratio", 4.0, 2.0), ("patch_size", 8, 16),
    ("tubelet_size", 1, 2), ("qkv_bias", "qkv", "qv"), ("norm_eps", 1e-6, 1e-12), ("pos_embed", "learned_st", "sincos"),
]


@pytest.mark.parametrize("key,value,pretrained", MISMATCHED_OVERRIDES, ids=[m[0] for m in MISMATCHED_OVERRIDES])
def test_overrides_that_contradict_the_pretrained_weights_are_refused(key, value, pretrained):
    import re
    with pytest.raises(ValueError, match=re.escape(f"override {key}={value!r} does not match the pretrained "
                                                   f"model's {key}={pretrained!r}")):
        models.from_transformers(hf_model(), **{key: value})


def test_overrides_that_keep_the_weights_are_allowed():
    hf = hf_model()
    vk = models.from_transformers(hf, embed_dim=48, depth=2, num_heads=2, num_classes=7, num_frames=8, img_size=32)
    assert vk.cfg.grid == (4, 2, 2) and vk.cfg.num_classes == 7
    assert all(k.startswith("head.") for k, *_ in vk.load_report.mismatched)
    assert vk.eval()(torch.randn(1, 3, 8, 32, 32)).shape == (1, 7)


def test_transformers4_layout_of_the_qv_biases_converts():
    """transformers 4.x keeps VideoMAE's q/v biases as attention.attention.q_bias/v_bias (5.x:
    query.bias/value.bias); from_transformers reads both."""
    import types
    hf = hf_model()
    with torch.no_grad():
        for layer in hf.videomae.encoder.layer:
            layer.attention.attention.query.bias.normal_(), layer.attention.attention.value.bias.normal_()
    legacy = {k.replace("attention.attention.query.bias", "attention.attention.q_bias")
               .replace("attention.attention.value.bias", "attention.attention.v_bias"): v
              for k, v in hf.state_dict().items()}
    assert any(k.endswith(".q_bias") for k in legacy) and not any(k.endswith("query.bias") for k in legacy)
    vk = models.from_transformers(types.SimpleNamespace(config=hf.config, state_dict=lambda: legacy)).eval()
    assert vk.load_report.clean
    clip = torch.randn(2, 3, 4, 64, 64)
    ref = logits(hf, clip, hf=True)
    assert (logits(vk, clip) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_converted_model_trains_as_the_original():
    """from_transformers added drop_path_rate=0.1 that VideoMAE lacks, dropped the HF config's
    dropout silently and turned a bf16 model into fp32."""
    from vidkern.nn.block import DropPath
    vk = models.from_transformers(hf_model())
    assert vk.cfg.drop_path_rate == 0.0
    assert all(m.p == 0.0 for m in vk.modules() if isinstance(m, DropPath))
    assert models.from_transformers(hf_model(), drop_path_rate=0.2).cfg.drop_path_rate == 0.2   # an override
    half = models.from_transformers(hf_model().to(torch.bfloat16))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        with pytest.raises(ValueError, match=f"'{field}': 0.1"):
            models.from_transformers(hf_model(**{field: 0.1}))
        vk = models.from_transformers(hf_model(**{field: 0.1}), hf_dropout="drop")
        assert vk.load_report.clean
    with pytest.raises(ValueError, match="hf_dropout must be 'refuse' or 'drop'"):
        models.from_transformers(hf_model(), hf_dropout="keep")
