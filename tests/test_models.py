"""Presets of vidkern.models build and train; the FLOP counter reproduces SPEC §4."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vidkern import flops, models
from vidkern.nn import STTM, TEAM, HSDAttention

SMALL = dict(embed_dim=48, num_heads=4, img_size=32, num_frames=4,
             team_ratios={"early": (0.25, 0.5, 0.75), "late": (0.125, 0.25, 0.5)})


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_every_preset_trains_at_a_small_size(name):
    model = models.create(name, **SMALL)
    cfg = model.cfg
    clips = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    logits = model(clips)
    assert logits.shape == (2, 174)
    F.cross_entropy(logits, torch.tensor([0, 5])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_presets_have_the_papers_structure():
    far = models.create("far_s")
    assert all(b.tgi is not None and b.attn.num_global_heads == 3 and b.attn.pattern == "checkerboard"
               for b in far.blocks)
    assert far.classifier.head.in_features == 2 * 384
    team = models.create("team_b")
    with_team = [i for i, b in enumerate(team.blocks) if b.team is not None]
    assert with_team == list(range(4, 12))
    widths = [[m.out_features for m in b.team.mlp if isinstance(m, torch.nn.Linear)] for b in team.blocks[4:]]
    assert widths[0] == [173, 346, 518, 768] and widths[-1] == [77, 154, 307, 768]   # SPEC §2 ViT-B
    sttm = models.create("sttm_vit_s")
    assert sttm.cfg.grid == (8, 14, 14) and sttm.cls_token.shape == (1, 1, 384)
    assert sttm.pos_spatial.shape == (1, 196, 384) and sttm.pos_temporal.shape == (1, 8, 384)
    vm = models.create("videomae_s")
    assert not any(p is vm.pos_embed for p in vm.parameters())      # fixed, not learned
    assert vm.blocks[0].attn.q_bias is not None and vm.blocks[0].attn.qkv.bias is None


def test_sincos_table_is_videomaes():
    def videomae(n, d):  # as published in VideoMAE's modeling_finetune.py
        def angles(pos):
            return [pos / np.power(10000, 2 * (j // 2) / d) for j in range(d)]
        table = np.array([angles(p) for p in range(n)])
        table[:, 0::2] = np.sin(table[:, 0::2])
        table[:, 1::2] = np.cos(table[:, 1::2])
        return torch.tensor(table, dtype=torch.float32)[None]
    torch.testing.assert_close(models.sincos_table(50, 24), videomae(50, 24))


def test_sttm_vit_feeds_cls_attention_to_both_merges(monkeypatch):
    seen = []
    real = STTM.forward

    def spy(self, x, e, scores=None, return_indices=False):
        seen.append((tuple(x.shape), None if scores is None else tuple(scores.shape)))
        assert scores is not None and torch.allclose(scores.sum(-1) <= 1 + 1e-5, torch.tensor(True))
        return real(self, x, e, scores, return_indices)
    monkeypatch.setattr(STTM, "forward", spy)
    model = models.create("sttm_vit_s", **SMALL).eval()
    model(torch.randn(2, 3, 4, 32, 32))
    # grid (4, 2, 2): spatial merge per frame 4 -> 2 tokens; then 8 -> 4 over all frames.
    assert seen == [((8, 4, 48), (8, 4)), ((2, 8, 48), (2, 8))]


def test_config_errors():
    with pytest.raises(ValueError, match="name must be one of"):
        models.create("vit_h")
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['attn'\]"):
        models.create("videomae_s", attn="hsda")
    with pytest.raises(ValueError, match="attention must be one of"):
        models.create("videomae_s", attention="local")
    with pytest.raises(ValueError, match="group_mean"):
        models.create("far_s", sttm=True)
    with pytest.raises(ValueError, match="CLS token belongs to no grid group"):
        models.create("sttm_vit_s", attention="hsda")


# --------------------------------------------------------------------------- FLOPs
SPEC_TABLE = {"global": 56.88, "sparse_dense": 45.55, "temporal": 34.34, "head_split_temporal": 45.61, "hsda": 51.21}


@pytest.mark.parametrize("attention,gmacs", sorted(SPEC_TABLE.items()))
def test_flop_table_of_spec_section_4(attention, gmacs):
    report = flops.count_preset("videomae_s", attention=attention)
    assert f"{report.gmacs:.2f}" == f"{gmacs:.2f}"
    assert report.params == 21_946_926   # patch 590,208 + 12 x 1,774,080 + fc_norm 768 + head 66,990


def test_attention_flops_count_attended_pairs_only():
    b, h, n, d = 2, 4, 30, 8
    q = torch.randn(b, h, n, d)
    for hg, pattern, pairs in ((4, "checkerboard", n * n), (0, "checkerboard", 16 * 16 + 14 * 14), (0, "temporal", 15 * 2 * 2),
                               (2, "checkerboard", (n * n + 452) / 2)):
        with FlopCounterMode(display=False) as counter:
            import vidkern
            vidkern.hsda(q, q, q, (2, 3, 5), hg, pattern)
        assert counter.get_total_flops() == 4 * d * b * h * pairs


def test_flop_counter_mode_agrees_with_count_forward_and_backward(monkeypatch):
    monkeypatch.setenv("VIDKERN_BACKEND", "torch")   # the custom ops and their FLOP formulas (not RULES' reference)
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = HSDAttention(32, 4, grid=(2, 3, 5), qv_bias=True)
            self.team = TEAM(32, (0.25, 0.5, 0.75))
            self.sttm = STTM(32, num_out=12)

        def forward(self, x):
            x = x + self.team(self.attn(x))
            return self.sttm(x, x)[0]
    model, x = Mixed().eval(), torch.randn(2, 30, 32)
    with FlopCounterMode(display=False) as counter:
        model(x)
    report = flops.count(model, x)
    by_op = counter.get_flop_counts()["Global"]
    selection = by_op[torch.ops.vidkern.orthogonal_select]   # registered with torch; left out by count (SPEC §4)
    assert selection > 0 and report.gmacs * 2e9 == counter.get_total_flops() - selection
    assert {"vidkern.hsda", "vidkern.soft_merge", "aten.addmm"} <= set(report.per_op)
    hsda_fwd = counter.get_flop_counts()["Global"][torch.ops.vidkern.hsda]
    x.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert counter.get_flop_counts()["Global"][torch.ops.vidkern.hsda_backward] == 2.5 * hsda_fwd


def test_flops_cli():
    out = subprocess.run([sys.executable, "-m", "vidkern.flops", "videomae_s", "attention=hsda"],
                         capture_output=True, text=True, check=True).stdout
    assert "51.21" in out and "21.95" in out and "vidkern.hsda" in out
    bad = subprocess.run([sys.executable, "-m", "vidkern.flops", "videomae_s", "attention"], capture_output=True, text=True)
    assert bad.returncode == 2 and "key=value" in bad.stderr


def test_every_preset_has_a_flop_count():
    for name in models.PRESETS:
        report = flops.count_preset(name)
        assert 30 < report.gmacs < 200 and math.isfinite(report.gmacs), name


@pytest.mark.parametrize("name", ["videomae_s", "sttm_vit_s"])
def test_position_embeddings_enter_the_first_block(name):
    model = models.create(name, **SMALL).eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    clips = torch.randn(2, 3, 4, 32, 32)
    model(clips)
    tokens = model.patch_embed(clips).flatten(2).transpose(1, 2)
    t, hp, wp = model.cfg.grid
    if name == "videomae_s":
        want = tokens + models.sincos_table(t * hp * wp, 48)
    else:  # token (t, h, w) gets spatial[h * Wp + w] + temporal[t]; the CLS token comes first
        pos = model.pos_spatial.repeat(1, t, 1) + model.pos_temporal.repeat_interleave(hp * wp, dim=1)
        want = torch.cat([(model.cls_token + model.cls_pos).expand(2, -1, -1), tokens + pos], dim=1)
    torch.testing.assert_close(seen[0], want)


def test_preset_counts_follow_from_their_parts():
    """FAR and TEAM add exactly their modules to VideoMAE ViT-S (GMACs with the conv-bias term)."""
    n, d, c = 1568, 384, 174
    base = flops.count_preset("videomae_s")
    hsda = flops.count_preset("videomae_s", attention="hsda")
    far = flops.count_preset("far_s")
    tgi_params = (d * 96 + 96) + (96 * 16 * 27 + 96) + (96 * d + d)
    assert far.params == base.params + 12 * tgi_params + d * c           # concat head: 2D -> C instead of D -> C
    tgi_macs = n * d * 96 + n * 96 * 16 * 27 + n * 96 + n * 96 * d        # fc1, grouped conv (+ bias), fc2
    group_mean_macs = n * d * 2
    assert abs(far.gmacs - (hsda.gmacs + (12 * tgi_macs + group_mean_macs + d * c) / 1e9)) < 1e-9
    team = flops.count_preset("team_s")
    early, late = [77, 154, 230], [31, 61, 123]

    def mlp(widths):
        dims = [d] + widths + [d]
        return sum(a * b for a, b in zip(dims[:-1], dims[1:])), sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    (em, ep), (lm, lp) = mlp(early), mlp(late)
    assert team.params == base.params + 4 * (ep + 2 * d) + 4 * (lp + 2 * d)   # + LN3 per TEAM block
    assert abs(team.gmacs - (base.gmacs + 4 * (em + lm) / 1e9)) < 1e-9


def test_team_ratios_per_block():
    for name, d, early, late in (("team_s", 384, (0.2, 0.4, 0.6), (0.08, 0.16, 0.32)),
                                 ("team_b", 768, (0.225, 0.45, 0.675), (0.1, 0.2, 0.4))):
        model = models.create(name)
        for i, blk in enumerate(model.blocks):
            if i < 4:
                assert blk.team is None
                continue
            widths = [m.out_features for m in blk.team.mlp if isinstance(m, torch.nn.Linear)][:3]
            want = [int(r * d + 0.5) for r in (early if i < 8 else late)]
            assert widths == want, (name, i, widths, want)


def test_drop_path_schedule_and_init():
    model = models.create("videomae_s", **SMALL, drop_path_rate=0.2)
    rates = [blk.drop_path.p for blk in model.blocks]
    assert rates == pytest.approx([0.2 * i / 11 for i in range(12)])
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.bias.abs().max() == 0 and 0.015 < fc1.weight.std() < 0.025
    assert model.head.weight.std() < 0.025 * 0.001 and model.head.bias.abs().max() == 0   # init_scale 0.001


def test_sttm_vit_merges_with_the_right_positions_and_scores(monkeypatch):
    from vidkern.nn import Block
    calls, cls_rows = [], {}
    real_sttm, real_block = STTM.forward, Block.forward

    def sttm_spy(self, x, e, scores=None, return_indices=False):
        y, p = real_sttm(self, x, e, scores, return_indices)
        calls.append(dict(e=e, scores=scores, p=p))
        return y, p

    def block_spy(self, x, grid=None, return_cls_attention=False):
        out = real_block(self, x, grid, return_cls_attention)
        if return_cls_attention:
            cls_rows[id(self)] = out[1]
        return out
    monkeypatch.setattr(STTM, "forward", sttm_spy)
    monkeypatch.setattr(Block, "forward", block_spy)
    model = models.create("sttm_vit_s", **SMALL).eval()
    model(torch.randn(2, 3, 4, 32, 32))
    t, hp, wp = model.cfg.grid
    pos = model._positions().expand(2, -1, -1).reshape(2 * t, hp * wp, 48)
    torch.testing.assert_close(calls[0]["e"], pos)                                 # stage 1: each frame's positions
    torch.testing.assert_close(calls[1]["e"], calls[0]["p"].reshape(2, -1, 48))    # stage 2: P of stage 1
    # the scores come from the block just before each merge (blocks 5 and 8, 1-based)
    assert list(cls_rows) == [id(model.blocks[4]), id(model.blocks[7])]
    torch.testing.assert_close(calls[0]["scores"], cls_rows[id(model.blocks[4])].reshape(2 * t, hp * wp))
    torch.testing.assert_close(calls[1]["scores"], cls_rows[id(model.blocks[7])])


def test_mean_pooling_leaves_out_the_cls_token():
    model = models.create("sttm_vit_s", **SMALL, classifier="mean").eval()
    clips = torch.randn(2, 3, 4, 32, 32)
    feats = model.forward_features(clips)
    torch.testing.assert_close(model(clips), model.head(model.fc_norm(feats[:, 1:].mean(1))))
    with pytest.raises(ValueError, match="CLS token belongs to no group"):
        models.create("sttm_vit_s", sttm=False, classifier="group_mean")


def test_flop_count_ignores_the_backend_setting(monkeypatch):
    monkeypatch.setenv("VIDKERN_BACKEND", "reference")
    assert f"{flops.count_preset('videomae_s', attention='sparse_dense').gmacs:.2f}" == "45.55"


# --------------------------------------------------------------------------- bad clips and configs
@pytest.mark.parametrize("name", ["videomae_s", "sttm_vit_s"])
def test_clips_must_have_exactly_the_configured_size(name):
    """The position embedding has one entry per token of the configured grid; a clip whose size
    merely rounds to it (5 frames into 4 with 2-frame tubelets, 40 px into 32 with 16 px patches)
    would be cropped by the tubelet convolution without a word, so it is refused."""
    model = models.create(name, **SMALL).eval()
    frames = model.cfg.num_frames
    assert model(torch.randn(1, 3, frames, 32, 32)).shape == (1, 174)
    with pytest.raises(ValueError, match=rf"clips must have T = num_frames = {frames} frames .* got T={frames + 1}"):
        model(torch.randn(1, 3, frames + 1, 32, 32))
    with pytest.raises(ValueError, match=r"clips must have H = W = img_size = 32 .* got H=40, W=40"):
        model(torch.randn(1, 3, frames, 40, 40))
    with pytest.raises(ValueError, match=r"img_size = 32 .* got H=32, W=48"):
        model(torch.randn(1, 3, frames, 32, 48))
    with pytest.raises(ValueError, match=r"clips must have shape \(B, 3, T, H, W\) with 3 channels, got \(1, 1, "):
        model(torch.randn(1, 1, frames, 32, 32))
    with pytest.raises(ValueError, match=r"clips must have shape \(B, 3, T, H, W\) \(5 dims\)"):
        model(torch.randn(3, frames, 32, 32))


NEVER_RUN = [
    # (preset, overrides, message)
    ("sttm_vit_s", dict(sttm_blocks=(5, 12)),
     r"sttm_blocks=\(5, 12\) names blocks \[12\] outside \[0, depth\) = \[0, 12\)"),
    ("sttm_vit_s", dict(depth=6), r"sttm_blocks=\(5, 8\) names blocks \[8\] outside \[0, depth\) = \[0, 6\)"),
    ("sttm_vit_s", dict(sttm_blocks=(8, 5)), r"sttm_blocks must be strictly increasing, got \(8, 5\)"),
    ("sttm_vit_s", dict(sttm_blocks=(5,)), r"sttm_blocks must hold 2 block indices, got \(5,\)"),
    ("sttm_vit_s", dict(sttm_ratios=(0.5, 1.0)), r"sttm_ratios\[1\] must be a merge ratio in \[0, 1\)"),
    ("videomae_s", dict(sttm=True, attention="hsda", sttm_blocks=(0, 6)), "sttm_blocks\\[0\\]=0 leaves none"),
    ("team_s", dict(team_blocks=(4, 12, 13)), r"team_blocks=\(4, 12, 13\) names blocks \[12, 13\] outside"),
    ("team_s", dict(depth=4), r"team_blocks=\(4, 5, 6, 7, 8, 9, 10, 11\) names blocks \[4, 5, 6, 7, 8, 9, 10, 11\]"),
    ("team_s", dict(team_blocks=()), "team_blocks must hold at least one block index"),
    ("team_s", dict(team_ratios={"early": (0.2, 0.4, 0.6)}), "team_ratios must be a dict"),
    ("team_s", dict(embed_dim=48, num_heads=4), "team_ratios are needed for embed_dim=48"),
    ("videomae_s", dict(depth=0), "depth must be a positive int, got 0"),
    ("videomae_s", dict(num_heads=0), "num_heads must be a positive int, got 0"),
    ("videomae_s", dict(num_heads=5), "embed_dim=384 must be divisible by num_heads=5"),
    ("far_s", dict(tgi_groups=0), "tgi_groups must be a positive int, got 0"),
    ("videomae_s", dict(drop_path_rate=1.5), r"drop_path_rate must be a probability in \[0, 1\]"),
    ("videomae_s", dict(pos_embed="rope"), "pos_embed must be one of"),
    ("videomae_s", dict(qkv_bias="k"), "qkv_bias must be one of"),
    ("far_s", dict(classifier_combine="sum"), "classifier_combine must be one of"),
    ("videomae_s", dict(backend="cudnn"), "backend must be one of"),
]


@pytest.mark.parametrize("name,overrides,match", NEVER_RUN, ids=[f"{n}-{'-'.join(o)}" for n, o, _ in NEVER_RUN])
def test_config_entries_that_can_never_run_are_refused(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        models.config(name, **overrides)


def test_a_hand_made_config_is_checked_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"sttm_blocks=\(5, 20\) names blocks \[20\]"):
        models.VideoViT(models.ViTConfig(sttm=True, sttm_blocks=(5, 20)))
    assert models.config("videomae_s", depth=2).depth == 2      # unused team/sttm blocks: team=sttm=False


FORCED = dict(embed_dim=64, num_heads=2, img_size=32, num_frames=4, depth=3, num_classes=5,
              team_ratios={"early": (0.25, 0.5, 0.75), "late": (0.125, 0.25, 0.5)})
FORCED_EXTRA = {"team": dict(team_blocks=(1, 2)), "sttm": dict(sttm_blocks=(1, 2))}


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "cuda"])
@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_every_preset_runs_under_every_forced_backend(name, backend, monkeypatch, cuda_kernel_device):
    """$VIDKERN_BACKEND forces a backend for the ops it has kernels for; the ops it lacks (triton:
    group_mean; cuda: hsda, group_mean) fall back to automatic dispatch, so whole models run —
    and compute what the reference does, forward and backward."""
    if backend == "cuda" and cuda_kernel_device.type != "cpu":
        pytest.skip("the emulator case; on a GPU test_gpu.py runs the CUDA kernels")
    extra = {k: val for key, fields in FORCED_EXTRA.items() if key in name for k, val in fields.items()}
    model = models.create(name, **FORCED, **extra)
    clips = torch.randn(2, 3, 4, 32, 32)
    monkeypatch.setenv("VIDKERN_BACKEND", "reference")
    model.eval()        # no drop path / random merge start: the two runs must see the same model
    want = model(clips)
    want_grads = torch.autograd.grad(want.square().sum(), list(model.parameters()), allow_unused=True)
    monkeypatch.setenv("VIDKERN_BACKEND", backend)
    got = model(clips)
    grads = torch.autograd.grad(got.square().sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(grads, want_grads):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
