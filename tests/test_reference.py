"""The reference against hand-computed cases, and its backward proven by gradcheck (float64)."""
import math

import pytest
import torch

from vidkern import patterns, reference as R

f64 = torch.float64


# --------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("grid", [(3, 5, 7), (1, 7, 7), (2, 4, 4), (1, 1, 1)])
def test_checkerboard_and_temporal_ids_follow_the_formula(grid):
    t, hp, wp = grid
    cb = patterns.group_ids("checkerboard", grid)
    tp = patterns.group_ids("temporal", grid)
    for n in range(t * hp * wp):
        h, w = (n // wp) % hp, n % wp
        assert cb[n] == (h + w) % 2
        assert tp[n] == h * wp + w
    assert patterns.group_ids("global", grid).eq(0).all()


@pytest.mark.parametrize("pattern", ["checkerboard", "temporal", "global", "explicit"])
def test_layout_buckets_cover_every_token_once_within_one_group(pattern):
    grid = (3, 5, 7)
    ids = torch.randint(0, 5, (105,)) if pattern == "explicit" else patterns.group_ids(pattern, grid)
    lay = patterns.layout(ids if pattern == "explicit" else pattern, grid, torch.device("cpu"))
    seen = torch.cat([b.index for b in lay.buckets])
    assert torch.equal(torch.sort(seen).values, torch.arange(105))
    for b in lay.buckets:
        groups = ids[b.index].view(b.count, b.size)
        assert (groups == groups[:, :1]).all(), "a bucket row mixes groups"
        assert groups[:, 0].unique().numel() == b.count


def test_odd_checkerboard_groups_differ_by_one_per_frame():
    lay = patterns.layout("checkerboard", (3, 5, 7), torch.device("cpu"))
    assert sorted((b.size, b.count) for b in lay.buckets) == [(51, 1), (54, 1)]


# --------------------------------------------------------------------------- hand-computed cases
def test_hsda_by_hand():
    # grid (1, 2, 2): checkerboard groups [0, 1, 1, 0]; head 0 global, head 1 sparse-dense.
    q = torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]], dtype=f64)
    k = torch.tensor([[1.0, 0], [0, 2], [1, 0], [0, 1]], dtype=f64)
    v = torch.tensor([[1.0, 2], [3, 4], [5, 6], [7, 8]], dtype=f64)
    qkv = [t.expand(1, 2, 4, 2) for t in (q, k, v)]
    out = R.hsda(*qkv, grid=(1, 2, 2), num_global_heads=1, scale=1.0)
    # token 0, global head: scores q0.k = [1, 0, 1, 0]
    w = torch.tensor([math.e, 1, math.e, 1], dtype=f64)
    assert torch.allclose(out[0, 0, 0], (w / w.sum()) @ v)
    # token 0, sparse head: only tokens {0, 3}, scores [1, 0]
    w = torch.tensor([math.e, 1], dtype=f64)
    assert torch.allclose(out[0, 1, 0], (w / w.sum()) @ v[[0, 3]])
    # token 2 (group 1), sparse head: tokens {1, 2}, scores q2.k = [2, 1]
    w = torch.tensor([math.e ** 2, math.e], dtype=f64)
    assert torch.allclose(out[0, 1, 2], (w / w.sum()) @ v[[1, 2]])


def test_hsda_singleton_groups_return_v():
    q, k, v = torch.randn(3, 1, 2, 3, 4, dtype=f64).unbind(0)
    out = R.hsda(q, k, v, (1, 1, 3), num_global_heads=0, pattern=torch.arange(3))
    assert torch.allclose(out, v)


def test_team_by_hand():
    x = torch.tensor([[[1.0, -1.0], [2.0, 0.5]]], dtype=f64)          # (1, 2, 2)
    # feature summary, channel 0: softmax([1, 2]) . [1, 2]
    f = R.feature_summary(x)
    assert torch.allclose(f[0, 0], torch.tensor((math.e + 2 * math.e ** 2) / (math.e + math.e ** 2), dtype=f64))
    h = torch.tensor([[0.0, math.log(3.0)]], dtype=f64)                # gates 0.5, 0.75
    y = R.team_gate(x, h)
    xp = [[0.5, -0.75], [1.0, 0.375]]
    s0 = [sum(math.exp(a) * a for a in row) / sum(math.exp(a) for a in row) for row in xp]
    s = [math.exp(v) / sum(math.exp(w) for w in s0) for v in s0]
    expect = torch.tensor([[[s[n] * a for a in xp[n]] for n in range(2)]], dtype=f64)
    assert torch.allclose(y, expect)


def test_orthogonal_select_by_hand():
    r = 2 ** -0.5
    x = torch.tensor([[[1.0, 0, 0], [r, r, 0], [0, 1, 0], [0, 0, 3], [1, 1, 1]]], dtype=f64)
    # start 0 -> token 2 (cos 0, lowest index among {2, 3}) -> token 3 (cos 0 to both) -> then
    # max|cos|: token 1 -> 0.707, token 4 -> 0.577: pick 4, then 1.
    assert R.orthogonal_select(x, 5, torch.tensor([0])).tolist() == [[0, 2, 3, 4, 1]]


def test_filter_keeps_highest_scores_lowest_index_on_ties():
    cand = torch.tensor([[5, 1, 3, 0]])
    scores = torch.tensor([[2.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    # candidate scores: 0 -> 2, 1 -> 1, 3 -> 1, 5 -> 1; keep 3: 0, then the lowest indices 1, 3.
    assert R.filter_by_scores(cand, scores, 3).tolist() == [[0, 1, 3]]


def test_select_meta_tokens_default_start_is_largest_norm_and_sorted():
    x = torch.randn(2, 12, 6, dtype=f64)
    x[0, 7] *= 100
    x[1, 2] *= 100
    idx = R.select_meta_tokens(x, 4)
    assert 7 in idx[0].tolist() and 2 in idx[1].tolist()
    assert torch.equal(idx, torch.sort(idx, dim=1).values)
    assert R.candidate_count(12, 4, True) == 6 and R.candidate_count(12, 10, True) == 12


def test_soft_merge_by_hand():
    # One meta token: C1 = 1 for every token, so C is uniform over tokens and A is the mean.
    u = R.normalize(torch.randn(2, 5, 3, dtype=f64))
    x, e = torch.randn(2, 5, 4, dtype=f64), torch.randn(1, 5, 4, dtype=f64)
    a, p = R.soft_merge(u, torch.tensor([[1], [4]]), x, e)
    assert torch.allclose(a, x.mean(1, keepdim=True))
    assert torch.allclose(p, e.mean(1, keepdim=True).expand(2, 1, 4))


def test_soft_merge_columns_are_convex_combinations():
    u = R.normalize(torch.randn(1, 9, 3, dtype=f64))
    x = torch.ones(1, 9, 2, dtype=f64)
    a, _ = R.soft_merge(u, torch.tensor([[0, 4, 8]]), x, x, tau=0.3)
    assert torch.allclose(a, torch.ones_like(a))


def test_group_mean_by_hand():
    x = torch.arange(8, dtype=f64).view(1, 4, 2)       # grid (1, 2, 2): groups [0, 1, 1, 0]
    g = R.group_mean(x, (1, 2, 2))
    assert g.tolist() == [[[3.0, 4.0], [3.0, 4.0]]]
    x = torch.arange(6, dtype=f64).view(1, 6, 1)       # grid (1, 2, 3): groups [0,1,0,1,0,1]
    assert R.group_mean(x, (1, 2, 3)).flatten().tolist() == [2.0, 3.0]


# --------------------------------------------------------------------------- gradcheck
def _req(*shapes):
    return [torch.randn(*s, dtype=f64, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("hg,pattern", [(1, "checkerboard"), (0, "temporal"), (2, "global")])
def test_gradcheck_hsda(hg, pattern):
    q, k, v = _req(*[(1, 2, 6, 3)] * 3)
    assert torch.autograd.gradcheck(lambda a, b, c: R.hsda(a, b, c, (1, 2, 3), hg, pattern, 0.7), (q, k, v))


def test_gradcheck_team():
    x, h = _req((2, 5, 4), (2, 4))
    assert torch.autograd.gradcheck(R.feature_summary, (x,))
    assert torch.autograd.gradcheck(R.team_gate, (x, h))


def test_gradcheck_soft_merge_and_group_mean():
    u0, x, e = _req((2, 7, 3), (2, 7, 4), (1, 7, 4))
    idx = torch.tensor([[0, 3, 5], [1, 2, 6]])
    assert torch.autograd.gradcheck(lambda u, a, b: R.soft_merge(R.normalize(u), idx, a, b, 0.5), (u0, x, e))
    assert torch.autograd.gradcheck(lambda a: R.group_mean(a, (1, 7, 1), "temporal"), (x,))
