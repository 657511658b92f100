"""The ``torch`` backend against the float64 reference (VERIFY.md tolerance rule), SPEC §5 shapes."""
import pytest
import torch

import vidkern
from vidkern import dispatch, reference as R
from vidkern.backends.pytorch import chunked_attention_backward, chunked_attention_forward
from selection_check import assert_greedy_picks
from tolerance import assert_close, check_against_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
GRIDS = [(3, 5, 7), (1, 7, 7), (2, 4, 4), (1, 1, 3)]


def _qkv(b, h, n, d):
    return [torch.randn(b, h, n, d) for _ in range(3)]


# --------------------------------------------------------------------------- attention
@pytest.fixture(params=[True, False], ids=["aten-flash", "row-chunked"])
def attention_path(request, monkeypatch):
    """Both per-group attention paths: ATen's fused CPU kernel, and the row-chunked exact softmax
    that runs off-CPU (here with tiny chunks, so every call spans several)."""
    be = dispatch.get("torch")
    monkeypatch.setattr(be, "fused_cpu_attention", request.param)
    monkeypatch.setattr(be, "chunk_elements", 2000)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("hg", [0, 2, 4])
def test_hsda_matches_reference(dtype, grid, hg, poison, attention_path):
    n = grid[0] * grid[1] * grid[2]
    check_against_reference(
        f"hsda{grid} Hg={hg}",
        lambda q, k, v: vidkern.hsda(q, k, v, grid, hg, backend="torch"),
        lambda q, k, v: R.hsda(q, k, v, grid, hg),
        _qkv(2, 4, n, 16), dtype)


@pytest.mark.parametrize("pattern", ["temporal", "global", "explicit"])
def test_hsda_other_patterns(pattern, poison, attention_path):
    grid = (3, 5, 7)
    pat = torch.randint(0, 6, (105,)) if pattern == "explicit" else pattern
    check_against_reference(
        f"hsda {pattern}",
        lambda q, k, v: vidkern.hsda(q, k, v, grid, 1, pat, scale=0.3, backend="torch"),
        lambda q, k, v: R.hsda(q, k, v, grid, 1, pat, 0.3),
        _qkv(2, 3, 105, 8), torch.float32)


@pytest.mark.parametrize("d", [32, 64, 128])
def test_hsda_head_dims(d):
    check_against_reference(
        f"hsda d={d}",
        lambda q, k, v: vidkern.hsda(q, k, v, (2, 3, 3), backend="torch"),
        lambda q, k, v: R.hsda(q, k, v, (2, 3, 3)),
        _qkv(1, 2, 18, d), torch.float32)


def test_hsda_noncontiguous_qkv_from_fused_projection_and_stride0_grad(attention_path):
    b, n, heads, d = 2, 35, 4, 8
    grid = (1, 5, 7)
    qkv64 = torch.randn(b, n, 3, heads, d, dtype=torch.float64)
    outs = {}
    for name, fn in (("torch", lambda *t: vidkern.hsda(*t, grid, backend="torch")), ("ref", lambda *t: R.hsda(*t, grid))):
        base = qkv64.float().clone().requires_grad_()
        q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)        # strided (B, H, N, d) views
        assert not q.is_contiguous()
        o = fn(q, k, v)
        o.sum().backward()                                    # the incoming grad is an expanded (stride-0) tensor
        outs[name] = (o, base.grad)
    truth = R.hsda(*qkv64.permute(2, 0, 3, 1, 4).unbind(0), grid)
    assert_close("hsda strided out", outs["torch"][0], truth, outs["ref"][0])
    wide = qkv64.clone().requires_grad_()
    R.hsda(*wide.permute(2, 0, 3, 1, 4).unbind(0), grid).sum().backward()
    assert_close("hsda strided grad", outs["torch"][1], wide.grad, outs["ref"][1])


@pytest.mark.parametrize("layout", ["head-dim-strided", "permuted"])
def test_hsda_any_strides(layout, attention_path):
    """Views whose head dim is not unit-stride (the private CPU kernel needs a copy) and fully
    permuted storage."""
    grid, shape = (2, 3, 3), (2, 4, 18, 8)
    if layout == "head-dim-strided":
        make = lambda: torch.randn(2, 4, 8, 18).transpose(-1, -2)  # noqa: E731
    else:
        make = lambda: torch.randn(8, 18, 2, 4).permute(2, 3, 1, 0)  # noqa: E731
    q, k, v = make(), make(), make()
    assert q.shape == shape and q.stride(-1) != 1
    check_against_reference(f"hsda {layout}", lambda a, b, c: vidkern.hsda(a, b, c, grid, 2, backend="torch"),
                            lambda a, b, c: R.hsda(a, b, c, grid, 2), [q, k, v], torch.float32)
    out = vidkern.hsda(q, k, v, grid, 2, backend="torch")
    torch.testing.assert_close(out, R.hsda(q, k, v, grid, 2), rtol=1e-5, atol=1e-6)


def test_hsda_grid_optional_when_all_heads_global():
    q, k, v = _qkv(1, 2, 11, 8)
    torch.testing.assert_close(vidkern.hsda(q, k, v, None, num_global_heads=2),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_sparse_dense_attention_is_hsda_with_no_global_heads():
    q, k, v = _qkv(1, 2, 30, 8)
    torch.testing.assert_close(vidkern.sparse_dense_attention(q, k, v, (2, 3, 5)),
                               R.hsda(q, k, v, (2, 3, 5), 0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_attention_math_path(dtype):
    """The exact-softmax path used off-CPU, run here with tiny chunks (several per call)."""
    q, k, v = [t.to(dtype) for t in _qkv(2, 3, 19, 8)]
    out, lse = chunked_attention_forward(q, k, v, 0.4, chunk_elements=2 * 3 * 19 * 4)
    truth = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.4, -1) @ v.double()
    assert_close("chunked out", out, truth, (torch.softmax(q @ k.transpose(-1, -2) * 0.4, -1) @ v))
    g = torch.randn_like(out)
    dq, dk, dv = chunked_attention_backward(g, q, k, v, out, lse, 0.4, chunk_elements=2 * 3 * 19 * 5)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(torch.softmax(leaves[0] @ leaves[1].transpose(-1, -2) * 0.4, -1) @ leaves[2],
                               leaves, g.double())
    low = [t.clone().requires_grad_() for t in (q, k, v)]
    low_g = torch.autograd.grad(torch.softmax(low[0] @ low[1].transpose(-1, -2) * 0.4, -1) @ low[2], low, g)
    for name, got, w, lg in zip("qkv", (dq, dk, dv), want, low_g):
        assert_close(f"chunked d{name}", got, w, lg)


def test_hsda_gradcheck_through_custom_op(attention_path):
    q, k, v = [t.double().requires_grad_() for t in _qkv(1, 3, 12, 4)]
    assert torch.autograd.gradcheck(lambda a, b, c: vidkern.hsda(a, b, c, (1, 3, 4), 1, backend="torch"), (q, k, v))


def test_hsda_empty_batch():
    q, k, v = [t.requires_grad_() for t in _qkv(0, 2, 12, 8)]
    out = vidkern.hsda(q, k, v, (1, 3, 4))
    assert out.shape == (0, 2, 12, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape


# --------------------------------------------------------------------------- TEAM
# Against the reference at the shared awkward shapes: tests/test_backends.py (every backend).
def test_team_noncontiguous_and_stride0_grad():
    h = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 10, 16, dtype=torch.float64).transpose(1, 2).requires_grad_()  # channels-first storage
    assert not x.is_contiguous()
    vidkern.team_gate(x, h, backend="torch").sum().backward()
    x_ref, h_ref = x.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    R.team_gate(x_ref, h_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(h.grad, h_ref.grad)
    f = vidkern.feature_summary(x, backend="torch")
    x.grad = None
    f.sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(R.feature_summary(x_ref).sum(), x_ref)[0])


def test_team_gradcheck_through_custom_ops():
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: vidkern.feature_summary(a, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda a, b: vidkern.team_gate(a, b, backend="torch"), (x, h))


# --------------------------------------------------------------------------- STTM
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,k", [((3, 49, 16), 24), ((2, 196, 32), 98), ((1, 5, 3), 5)])
def test_orthogonal_select_is_greedy_optimal(dtype, shape, k):
    """Judged in float64 given the op's own earlier picks (vidkern.verify), not by equality
    with the reference, whose float32 cosines are computed differently."""
    x = torch.randn(shape).to(dtype)
    start = torch.randint(0, shape[1], (shape[0],))
    assert_greedy_picks(vidkern.orthogonal_select(x, k, start, backend="torch"), x, start)


def test_orthogonal_select_ties_go_to_lowest_index():
    x = torch.randn(1, 6, 4)
    x[0, 4] = x[0, 1]          # duplicates: equal scores everywhere
    x[0, 5] = -x[0, 2]
    idx = vidkern.orthogonal_select(x, 6, torch.tensor([0]), backend="torch")[0].tolist()
    assert idx.index(1) < idx.index(4) and idx.index(2) < idx.index(5)
    assert sorted(idx) == list(range(6))


@pytest.mark.parametrize("with_scores", [False, True])
def test_select_meta_tokens_filters_greedy_candidates(with_scores):
    """The candidates (from the largest-norm token) are greedy-optimal; the result is exactly the
    reference's filter of them (score ties broken by the lowest index), sorted."""
    x = torch.randn(4, 60, 12, dtype=torch.float64)
    scores = torch.randn(4, 60, dtype=torch.float64).round(decimals=1) if with_scores else None  # ties on purpose
    got = vidkern.select_meta_tokens(x, 20, scores, backend="torch")
    start = R.default_start(x)
    candidates = vidkern.orthogonal_select(x, 30 if with_scores else 20, start, backend="torch")
    assert_greedy_picks(candidates, x, start)
    want = R.filter_by_scores(candidates, scores, 20) if with_scores else torch.sort(candidates, dim=1).values
    assert torch.equal(got, want)
    assert got.dtype == torch.long and torch.equal(got, torch.sort(got, dim=1).values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("e_batch", [1, 3])
def test_soft_merge_matches_reference_over_several_chunks(dtype, e_batch, poison, monkeypatch):
    monkeypatch.setattr(dispatch.get("torch"), "chunk_elements", 3 * 10 * 7)  # 7-token chunks, ragged last
    b, length, lp = 3, 40, 10
    u = R.normalize(torch.randn(b, length, 12))
    idx = torch.stack([torch.randperm(length)[:lp].sort().values for _ in range(b)])
    x, e = torch.randn(b, length, 16), torch.randn(e_batch, length, 16)
    check_against_reference(
        "soft_merge", lambda uu, xx, ee: vidkern.soft_merge(uu, idx, xx, ee, 0.5, backend="torch"),
        lambda uu, xx, ee: R.soft_merge(uu, idx, xx, ee, 0.5), [u, x, e], dtype)


def test_soft_merge_gradcheck_through_custom_op(monkeypatch):
    monkeypatch.setattr(dispatch.get("torch"), "chunk_elements", 2 * 3 * 3)
    u = torch.randn(2, 8, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 8, 4, dtype=torch.float64, requires_grad=True)
    e = torch.randn(1, 8, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 3, 5], [1, 2, 6]])  # (a repeated index is refused: SPEC §3.2)
    assert torch.autograd.gradcheck(
        lambda a, b, c: vidkern.soft_merge(R.normalize(a), idx, b, c, 0.8, backend="torch"), (u, x, e))


def test_soft_merge_single_output_grad():
    u = R.normalize(torch.randn(2, 9, 4, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 4], [2, 8]])
    a, _ = vidkern.soft_merge(u, idx, x, x.detach(), backend="torch")
    a.sum().backward()
    u2, x2 = u.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    R.soft_merge(u2, idx, x2, x.detach())[0].sum().backward()
    torch.testing.assert_close(u.grad, u2.grad)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["checkerboard", "temporal", "global"])
def test_group_mean_matches_reference(pattern, dtype):
    x = torch.randn(2, 8 * 14 * 14, 8) + 100      # large values over 1568 tokens: a float16 sum overflows
    check_against_reference(f"group_mean {pattern}", lambda a: vidkern.group_mean(a, (8, 14, 14), pattern, backend="torch"),
                            lambda a: R.group_mean(a, (8, 14, 14), pattern), [x], dtype)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration of every custom op."""
    from vidkern import library
    q, k, v = [t.double().requires_grad_() for t in _qkv(1, 2, 12, 4)]
    torch.library.opcheck(library.DEFINED["hsda"].op, (q, k, v, [1, 3, 4], "checkerboard", None, 1, 0.5, "torch"))
    torch.library.opcheck(library.DEFINED["hsda"].op, (q, k, v, [1, 3, 4], "explicit", torch.randint(0, 3, (12,)), 0, 0.5, "torch"))
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(library.DEFINED["feature_summary"].op, (x, "torch"))
    torch.library.opcheck(library.DEFINED["team_gate"].op, (x, h, "torch"))
    u = R.normalize(torch.randn(2, 7, 5, dtype=torch.float64)).requires_grad_()
    idx = torch.tensor([[0, 2, 6], [1, 3, 5]])
    torch.library.opcheck(library.DEFINED["soft_merge"].op, (u, idx, x, x.detach().clone().requires_grad_(), 1.0, "torch", True))
    torch.library.opcheck(library.DEFINED["orthogonal_select"].op, (x.detach(), 3, torch.tensor([0, 4]), "torch", True))
    # Non-contiguous inputs: the real outputs must have the (contiguous) strides the fakes promise.
    xt = torch.randn(2, 5, 7, dtype=torch.float64).transpose(1, 2).requires_grad_()
    torch.library.opcheck(library.DEFINED["feature_summary"].op, (xt, "torch"))
    torch.library.opcheck(library.DEFINED["team_gate"].op, (xt, h, "torch"))
    qt, kt, vt = [torch.randn(1, 2, 4, 12, dtype=torch.float64).transpose(-1, -2).requires_grad_() for _ in range(3)]
    torch.library.opcheck(library.DEFINED["hsda"].op, (qt, kt, vt, [1, 3, 4], "checkerboard", None, 1, 0.5, "torch"))
    torch.library.opcheck(library.DEFINED["soft_merge"].op, (u.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(),
                                               idx, xt, xt.detach().clone().requires_grad_(), 1.0, "torch", True))
