"""Memory claims (no (N, N) or (L, L') tensor is ever allocated), ViT-S-sized shapes, and
property-based checks over random shapes."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import vidkern
from vidkern import dispatch, reference as R
from tolerance import check_against_reference


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_soft_merge_never_allocates_the_token_by_meta_matrix(monkeypatch):
    b, length, lp, d = 1, 1568, 784, 32
    monkeypatch.setattr(dispatch.get("torch"), "chunk_elements", 1 << 16)   # 83-token chunks
    u = R.normalize(torch.randn(b, length, d)).requires_grad_()
    x, e = torch.randn(b, length, d, requires_grad=True), torch.randn(1, length, d, requires_grad=True)
    idx = vidkern.select_meta_tokens(x, lp)
    be = dispatch.get("torch")
    e = e.expand(b, -1, -1)
    # The backend's forward and backward run directly: a dispatch mode sees a custom op only from outside.
    with LargestTensor() as probe:
        a, p, row_lse, col_sum = be.soft_merge_forward(u, idx, x, e, 1.0)
        be.soft_merge_backward(torch.ones_like(a), p, u, idx, x, e, a, p, row_lse, col_sum, 1.0)
    assert probe.largest <= (1 << 16) + length * d, f"largest tensor {probe.largest} elements vs L*L'={length * lp}"
    with LargestTensor() as probe:
        R.soft_merge(u, idx, x, e)
    assert probe.largest >= length * lp  # the probe does see the reference's (L, L') matrix


@pytest.mark.parametrize("fused", [True, False], ids=["aten-flash", "row-chunked"])
def test_sparse_dense_heads_never_allocate_a_score_matrix(fused, monkeypatch):
    grid, n = (8, 14, 14), 1568
    be = dispatch.get("torch")
    monkeypatch.setattr(be, "fused_cpu_attention", fused)
    monkeypatch.setattr(be, "chunk_elements", 1 << 16)
    q, k, v = [torch.randn(1, 2, n, 64) for _ in range(3)]
    with LargestTensor() as probe:
        out, lse = be.hsda_forward(q, k, v, grid, "checkerboard", 0, 0.125)
        be.hsda_backward(out, q, k, v, out, lse, grid, "checkerboard", 0, 0.125)
    assert probe.largest < n * n // 4, f"largest tensor {probe.largest} elements; a per-group score matrix is {n * n // 4}"
    with LargestTensor() as probe:
        R.hsda(q, k, v, grid, 0)
    assert probe.largest >= n * n


@pytest.mark.parametrize("hg", [3, 0])
def test_hsda_vit_s_shape(hg):
    grid = (8, 14, 14)
    check_against_reference(
        f"hsda ViT-S Hg={hg}", lambda q, k, v: vidkern.hsda(q, k, v, grid, hg, backend="torch"),
        lambda q, k, v: R.hsda(q, k, v, grid, hg), [torch.randn(1, 6, 1568, 64) for _ in range(3)], torch.float32)


def test_sttm_stages_vit_s_shapes():
    # Spatial stage: (8 frames, 196 tokens) -> 98; spatio-temporal: 784 -> 392.
    for shape, lp in (((8, 196, 384), 98), ((1, 784, 384), 392)):
        x = torch.randn(shape, dtype=torch.float64)
        idx = vidkern.select_meta_tokens(x, lp, backend="torch")
        assert torch.equal(idx, R.select_meta_tokens(x, lp))
        u = R.normalize(torch.randn(shape))
        check_against_reference(
            f"soft_merge {shape}", lambda uu, xx, ee: vidkern.soft_merge(uu, idx, xx, ee, backend="torch"),
            lambda uu, xx, ee: R.soft_merge(uu, idx, xx, ee), [u, x.float(), torch.randn(1, *shape[1:])],
            torch.float32)


LONG_CLIP = (12544, 6272, 768)   # 64 frames of 224x224 in 2x16x16 tubelets -> half merged, ViT-B width


@pytest.mark.slow
def test_long_clip_on_the_torch_backend():
    """L = 12544 -> L' = 6272, D = 768 at full size (about 20 s): selection and soft merge forward
    and backward never allocate an (L, L') tensor (78.7M elements); selection's first picks and
    the merge forward equal the reference's (which does allocate it: 0.3 GB in float32)."""
    length, lp, d = LONG_CLIP
    x = torch.randn(1, length, d)
    be = dispatch.get("torch")
    start = R.default_start(x)
    with LargestTensor() as probe:
        picks = be.orthogonal_select(x, lp, start)
    assert probe.largest < length * lp, probe.largest
    assert picks.unique().numel() == lp and picks[0, 0] == start[0]
    assert torch.equal(picks[:, :8], R.orthogonal_select(x, 8, start))       # reference: an (L, L) matrix
    idx = torch.sort(picks, dim=1).values
    u, e = R.normalize(torch.randn(1, length, d)), torch.randn(1, length, d)
    with LargestTensor() as probe:
        a, p, row_lse, col_sum = be.soft_merge_forward(u, idx, x, e, 1.0)
        be.soft_merge_backward(torch.randn_like(a), torch.randn_like(p), u, idx, x, e, a, p, row_lse, col_sum, 1.0)
    assert probe.largest <= length * d < length * lp, probe.largest
    ref_a, ref_p = R.soft_merge(u, idx, x, e)
    torch.testing.assert_close(a, ref_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p, ref_p, rtol=1e-4, atol=1e-5)


grids = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))


@settings(max_examples=40, deadline=None)
@given(grid=grids, heads=st.integers(1, 4), d=st.sampled_from([1, 5, 8, 16]), batch=st.integers(1, 2),
       data=st.data())
def test_hsda_property(grid, heads, d, batch, data):
    n = grid[0] * grid[1] * grid[2]
    hg = data.draw(st.integers(0, heads))
    pattern = data.draw(st.sampled_from(["checkerboard", "temporal", "global", "explicit"]))
    if pattern == "explicit":
        pattern = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    q, k, v = [torch.randn(batch, heads, n, d, dtype=torch.float64) for _ in range(3)]
    torch.testing.assert_close(vidkern.hsda(q, k, v, grid, hg, pattern, backend="torch"),
                               R.hsda(q, k, v, grid, hg, pattern), rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 40), d=st.integers(1, 9), data=st.data())
def test_selection_and_merge_property(batch, length, d, data):
    lp = data.draw(st.integers(1, length))
    x = torch.randn(batch, length, d, dtype=torch.float64)
    scores = torch.randn(batch, length, dtype=torch.float64) if data.draw(st.booleans()) else None
    idx = vidkern.select_meta_tokens(x, lp, scores, backend="torch")
    assert torch.equal(idx, R.select_meta_tokens(x, lp, scores))
    assert (idx.diff(dim=1) > 0).all()  # sorted and distinct
    u = R.normalize(torch.randn(batch, length, d, dtype=torch.float64))
    e = torch.randn(1, length, d, dtype=torch.float64)
    tau = data.draw(st.floats(0.05, 5.0))
    for got, want in zip(vidkern.soft_merge(u, idx, x, e, tau, backend="torch"), R.soft_merge(u, idx, x, e, tau)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
