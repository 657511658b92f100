"""vidkern.models.load_checkpoint on synthetic checkpoints in the original VideoMAE / MVD formats."""
import pytest
import torch

from vidkern import models

SMALL = dict(depth=2, num_frames=4, img_size=64, num_classes=7)


def videomae_names(state):
    """vidkern's state dict under VideoMAE's names (the patch embedding's conv is ``proj``)."""
    return {k.replace("patch_embed.", "patch_embed.proj."): v.clone() for k, v in state.items()}


def assert_loaded(model, state, keys):
    own = model.state_dict()
    for k in keys:
        assert torch.equal(own[k], state[k]), k


def test_finetuning_checkpoint_file_round_trip(tmp_path):
    src = models.create("videomae_s", **SMALL)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": videomae_names(src.state_dict()), "epoch": 3, "args": None}, path)
    dst = models.create("videomae_s", **SMALL)
    report = models.load_checkpoint(dst, str(path), strict=True)
    assert report.clean and len(report.loaded) == len(src.state_dict())
    assert_loaded(dst, src.state_dict(), src.state_dict())
    x = torch.randn(1, 3, 4, 64, 64)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def test_pretraining_checkpoint_loads_the_encoder_and_ignores_the_decoder():
    src = models.create("videomae_s", **SMALL)
    enc = {"encoder." + k: v for k, v in videomae_names(src.state_dict()).items()
           if not k.startswith(("head.", "fc_norm."))}
    enc["encoder.norm.weight"], enc["encoder.norm.bias"] = torch.ones(384), torch.zeros(384)   # encoder's last norm
    ckpt = {"module": {**enc, "decoder.blocks.0.norm1.weight": torch.ones(192), "mask_token": torch.zeros(1, 1, 192),
                       "encoder_to_decoder.weight": torch.zeros(192, 384), "decoder_pos_embed": torch.zeros(1, 8, 192),
                       "encoder.pos_embed": torch.zeros(1, 64, 384)}}
    dst = models.create("videomae_s", **SMALL)
    report = models.load_checkpoint(dst, ckpt)
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.unexpected) == ["encoder.norm.bias", "encoder.norm.weight"]
    assert set(report.ignored) == {"decoder.blocks.0.norm1.weight", "mask_token", "encoder_to_decoder.weight",
                                   "decoder_pos_embed", "encoder.pos_embed"}    # the fixed sin-cos table
    assert_loaded(dst, src.state_dict(), [k for k in src.state_dict() if k.startswith(("blocks.", "patch_embed."))])
    with pytest.raises(ValueError, match=r"missing \(4\): fc_norm.bias.*unexpected \(2\): encoder.norm"):
        models.load_checkpoint(models.create("videomae_s", **SMALL), ckpt, strict=True)


def test_head_of_another_dataset_is_reported_and_left_initialised():
    src = models.create("videomae_s", **{**SMALL, "num_classes": 400})
    dst = models.create("videomae_s", **SMALL)
    head = dst.head.weight.clone()
    report = models.load_checkpoint(dst, {"state_dict": src.state_dict()})
    assert sorted(report.mismatched) == [("head.bias", (400,), (7,)), ("head.weight", (400, 384), (7, 384))]
    assert torch.equal(dst.head.weight, head) and not report.missing
    with pytest.raises(ValueError, match="mismatched"):
        models.load_checkpoint(dst, src.state_dict(), strict=True)


def test_strict_failure_loads_nothing():
    src, dst = models.create("videomae_s", **{**SMALL, "num_classes": 400}), models.create("videomae_s", **SMALL)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError):
        models.load_checkpoint(dst, src.state_dict(), strict=True)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_learned_position_embeddings_are_interpolated():
    """STTM's ViT (learned spatial + temporal tables): 4x4 patches, 4 frames -> 6x6, 8 frames."""
    src = models.create("sttm_vit_s", num_frames=4, img_size=64, num_classes=7)
    dst = models.create("sttm_vit_s", num_frames=8, img_size=96, num_classes=7)
    report = models.load_checkpoint(dst, {"model": src.state_dict()}, strict=True)
    assert sorted(r.split()[0] for r in report.interpolated) == ["pos_spatial", "pos_temporal"]
    grid = src.pos_spatial.detach().transpose(1, 2).reshape(1, 384, 4, 4)
    want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic").reshape(1, 384, 36).transpose(1, 2)
    torch.testing.assert_close(dst.pos_spatial.detach(), want)
    assert dst.pos_temporal.shape == (1, 8, 384)
    assert dst.eval()(torch.randn(1, 3, 8, 96, 96)).shape == (1, 7)


def test_far_classifier_takes_the_pooling_norm():
    """A VideoMAE checkpoint into FAR: blocks and fc_norm load; the wider group-mean head and the
    new TGI modules stay initialised and are reported."""
    src = models.create("videomae_s", **SMALL)
    dst = models.create("far_s", **SMALL)
    report = models.load_checkpoint(dst, videomae_names(src.state_dict()))
    assert torch.equal(dst.classifier.fc_norm.weight, src.fc_norm.weight)
    assert ("classifier.head.weight", (7, 384), (7, 768)) in report.mismatched
    assert all(".tgi." in k for k in report.missing)


def hf_state_dict(model, legacy=False):
    """``model``'s weights under Hugging Face VideoMAE's names: transformers 5.x keeps the q/v
    biases as ``query.bias``/``value.bias``, 4.x (``legacy``) as ``attention.attention.q_bias``/``v_bias``."""
    sd, out = model.state_dict(), {}
    out.update({f"videomae.embeddings.patch_embeddings.projection.{k}": sd[f"patch_embed.{k}"]
                for k in ("weight", "bias")})
    layer_names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                   "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(model.cfg.depth):
        hf, att = f"videomae.encoder.layer.{i}.", f"videomae.encoder.layer.{i}.attention.attention."
        for name, w in zip(("query", "key", "value"), sd[f"blocks.{i}.attn.qkv.weight"].chunk(3)):
            out[f"{att}{name}.weight"] = w
        for name, bias in (("query", "q_bias"), ("value", "v_bias")):
            out[att + (bias if legacy else f"{name}.bias")] = sd[f"blocks.{i}.attn.{bias}"]
        for vk, name in layer_names.items():
            out.update({f"{hf}{name}.{k}": sd[f"blocks.{i}.{vk}.{k}"] for k in ("weight", "bias")})
    out.update({f"{p}.{k}": sd[f"{v}.{k}"] for p, v in (("fc_norm", "fc_norm"), ("classifier", "head"))
                for k in ("weight", "bias")})
    return out


@pytest.mark.parametrize("legacy", [False, True], ids=["transformers5", "transformers4"])
def test_hf_state_dict_loads_in_both_layouts_of_the_qv_biases(legacy):
    from vidkern.checkpoints import from_hf_state_dict
    src = models.create("videomae_s", **SMALL)
    with torch.no_grad():
        for blk in src.blocks:
            blk.attn.q_bias.normal_(), blk.attn.v_bias.normal_()
    dst = models.create("videomae_s", **SMALL)
    report = models.load_checkpoint(dst, from_hf_state_dict(hf_state_dict(src, legacy)), strict=True)
    assert report.clean and len(report.loaded) == len(src.state_dict())
    assert_loaded(dst, src.state_dict(), src.state_dict())
