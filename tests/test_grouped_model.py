"""Grouped token order through the modules and the whole model (issue 14): with the same weights,
a grouped-order model computes the natural-order model's logits and gradients (fp32, to
rounding), and every module computes the natural-order result on permuted tokens."""
import pytest
import torch

from vidkern import models, patterns
from vidkern.nn import Block, GroupAveragedClassifier, HSDAttention, TokenGroupInteraction

GRID = (2, 3, 4)
N = 24


def _perm(pattern="checkerboard", grid=GRID):
    return patterns.grouped_order(pattern, grid, "cpu")[0]


def _pair(cls, *args, **kwargs):
    """A natural-order module and a grouped-order one with the same weights."""
    torch.manual_seed(0)
    natural = cls(*args, **kwargs)
    grouped = cls(*args, token_order="grouped", **kwargs)
    grouped.load_state_dict(natural.state_dict())
    return natural, grouped


@pytest.mark.parametrize("make", [
    lambda: _pair(HSDAttention, 32, 4, GRID),
    lambda: _pair(HSDAttention, 32, 4, GRID, num_global_heads=1, pattern="temporal"),
    lambda: _pair(TokenGroupInteraction, 32, GRID, num_groups=2),
    lambda: _pair(Block, 32, 4, GRID, token_group_interaction=True, tgi_groups=2),
], ids=["attention", "attention-temporal", "tgi", "block"])
def test_token_modules_match_on_permuted_tokens(make):
    natural, grouped = make()
    pattern = getattr(natural, "pattern", None) or getattr(getattr(natural, "attn", None), "pattern", "checkerboard")
    perm = _perm(pattern)
    x = torch.randn(2, N, 32, requires_grad=True)
    want = natural(x)[:, perm]
    xg = x.detach()[:, perm].requires_grad_()
    got = grouped(xg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    (want * g).sum().backward()
    (got * g).sum().backward()
    torch.testing.assert_close(xg.grad, x.grad[:, perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", ["concat", "mean"])
def test_group_averaged_classifier_pools_contiguous_groups(combine):
    natural, grouped = _pair(GroupAveragedClassifier, 16, 5, GRID, combine=combine)
    x = torch.randn(2, N, 16)
    torch.testing.assert_close(grouped(x[:, _perm()]), natural(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_grouped_model_matches_natural_model(train):
    kw = dict(depth=2, embed_dim=48, num_heads=4, num_frames=4, img_size=48, num_classes=5, drop_path_rate=0.0,
              head_init_scale=1.0)
    torch.manual_seed(0)
    natural = models.create("far_s", token_order="natural", **kw)
    grouped = models.create("far_s", token_order="grouped", **kw)
    assert list(grouped.state_dict()) == list(natural.state_dict())     # a permutation moves no weights
    grouped.load_state_dict(natural.state_dict())
    natural.train(train)
    grouped.train(train)
    clips = torch.randn(2, 3, 4, 48, 48)
    want, got = natural(clips), grouped(clips)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    want.square().sum().backward()
    got.square().sum().backward()
    for (name, a), b in zip(natural.named_parameters(), grouped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_grouped_order_config_rules():
    with pytest.raises(ValueError, match="token_order must be one of"):
        models.config("far_s", token_order="sorted")
    for bad in (dict(attention="global"), dict(attention="temporal"),
                dict(preset="sttm_vit_s")):
        preset = bad.pop("preset", "far_s")
        with pytest.raises(ValueError, match="token_order='grouped' orders the tokens"):
            models.config(preset, token_order="grouped", **bad)
