"""The STTM kernels (selection, soft merge) of the ``triton`` and ``cuda`` backends against the
float64 reference.

Without a GPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), with 16-wide tiles so that small shapes still span several tiles with ragged
ends; the CUDA kernels run in the CPU emulator (conftest.py: cuda_kernel_device)."""
import pytest
import torch

import vidkern
from vidkern import dispatch, reference as R
from tolerance import check_against_reference
from selection_check import assert_greedy_picks
from test_scale import LargestTensor

GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["triton", "cuda"])
def kernels(request, monkeypatch):
    """(backend name, device) of the kernels under test."""
    return _kernels(request.param, request, monkeypatch)


@pytest.fixture(params=["triton-materialised", "triton-streamed", "cuda"])
def merge_kernels(request, monkeypatch):
    """(backend name, device) of the soft-merge kernels under test: the Triton launcher's two paths
    forced whatever the shape (``merge_materialises`` picks between them by ``L' <= 2 D``), and CUDA's."""
    backend, _, path = request.param.partition("-")
    out = _kernels(backend, request, monkeypatch)
    if path:
        from vidkern.kernels import merge
        monkeypatch.setattr(merge, "merge_materialises", lambda lp, d: path == "materialised")
    return out


def _kernels(name, request, monkeypatch):
    if name == "cuda":
        return "cuda", request.getfixturevalue("cuda_kernel_device")
    device = torch.device("cuda" if GPU else "cpu")
    reasons = dispatch.get("triton").reasons("soft_merge", device, torch.float32, forced=True)
    if reasons:
        pytest.skip("; ".join(reasons))
    if not GPU:
        from vidkern.kernels import merge, selection
        from vidkern.kernels.launch import Config
        # 16-row Gram tiles (several tile pairs, ragged ends), 16-wide streaming tiles (fallback)
        monkeypatch.setattr(selection, "GRAM_BLOCKS",
                            dict.fromkeys(("half", "fp32"), Config.of(BLOCK=16, BLOCK_D=16, num_warps=4, num_stages=3)))
        monkeypatch.setattr(selection, "SELECT_BLOCKS", Config.of(BLOCK_L=16, BLOCK_D=16))
        monkeypatch.setattr(merge, "merge_blocks", lambda dtype: (16, 16, 16, 16))
    return "triton", device


def skip_unsupported(backend, op, dev, dtype):
    """Skip with the backend's own reasons (the triton backend refuses bf16 soft merging on CPU:
    Triton's interpreter computes bf16 tl.dot wrongly; tests/test_triton_backend.py checks that)."""
    reasons = dispatch.get(backend).reasons(op, dev, dtype, forced=True)
    if reasons:
        pytest.skip("; ".join(reasons))


def rel_err(got, truth):
    """Relative Frobenius error against float64."""
    return ((got.double() - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 49, 24, 24), (1, 1, 8, 1), (2, 37, 40, 37), (3, 70, 17, 35)])
def test_selection_is_greedy_optimal(shape, dtype, kernels):
    """Every pick is the most orthogonal one in float64 given the kernel's own earlier picks
    (vidkern.verify: float32 cosines may break a near tie either way)."""
    backend, dev = kernels
    b, length, d, k = shape
    x = torch.randn(b, length, d).to(dtype)
    start = torch.randint(0, length, (b,))
    got = vidkern.orthogonal_select(x.to(dev), k, start.to(dev), backend=backend)
    assert got.dtype == torch.long and got.shape == (b, k)
    assert_greedy_picks(got, x, start)


def test_selection_ties_go_to_the_lowest_index(kernels):
    """Mutually orthogonal tokens: every unchosen token scores exactly 0, so after the start the
    picks are the remaining indices in ascending order, across tile boundaries."""
    length = 40
    backend, dev = kernels
    x = (torch.eye(length) * 2.0 ** torch.randint(-3, 4, (length, 1)))[None].to(dev)
    got = vidkern.orthogonal_select(x, length, torch.tensor([17], device=dev), backend=backend)
    assert got.tolist() == [[17] + [i for i in range(length) if i != 17]]


def test_selection_never_picks_a_token_twice(kernels):
    """Exact duplicates (one-hot rows, |cos| exactly 1 or 0): once the orthogonal tokens run out,
    every unchosen token scores 1 — as does every chosen one against itself, so chosen tokens
    must be excluded explicitly."""
    backend, dev = kernels
    x = torch.cat([torch.eye(20), torch.eye(20)])[None].to(dev)    # token i and token 20 + i are equal
    got = vidkern.orthogonal_select(x, 40, torch.tensor([3], device=dev), backend=backend)
    assert sorted(got[0].tolist()) == list(range(40))
    assert torch.equal(got.cpu(), R.orthogonal_select(x.double(), 40, torch.tensor([3])).cpu())


@pytest.mark.parametrize("kernels", ["triton"], indirect=True)   # the Gram chunks are the triton launcher's
@pytest.mark.parametrize("dtype", DTYPES)
def test_selection_gram_in_chunks(dtype, kernels, monkeypatch, poison):
    """Triton: a Gram scratch of two problems, so 5 problems run in chunks of 2, 2, 1 (the scratch
    is reused; a stale or unwritten entry would show as a wrong pick or a NaN)."""
    backend, dev = kernels
    from vidkern.kernels import selection
    b, length, d, k = 5, 37, 20, 30
    monkeypatch.setattr(selection, "GRAM_SCRATCH_BYTES", 2 * 4 * length * length + 5)
    assert selection.chunk_problems(length) == 2
    x = torch.randn(b, length, d).to(dtype)
    start = torch.randint(0, length, (b,))
    got = vidkern.orthogonal_select(x.to(dev), k, start.to(dev), backend=backend)
    assert_greedy_picks(got, x, start)


@pytest.mark.parametrize("kernels", ["triton"], indirect=True)   # the fallback is the triton launcher's
@pytest.mark.parametrize("dtype", DTYPES)
def test_selection_streaming_fallback(dtype, kernels, monkeypatch):
    """Triton: above GREEDY_MAX_L tokens the launcher streams X every step instead of building the
    Gram matrix (lowered here to 32): the same rule, ties included."""
    backend, dev = kernels
    from vidkern.kernels import selection
    monkeypatch.setattr(selection, "GREEDY_MAX_L", 32)
    x = torch.randn(2, 49, 24).to(dtype)
    start = torch.randint(0, 49, (2,))
    assert_greedy_picks(vidkern.orthogonal_select(x.to(dev), 24, start.to(dev), backend=backend), x, start)
    length = 40
    x = (torch.eye(length) * 2.0 ** torch.randint(-3, 4, (length, 1)))[None].to(dtype).to(dev)
    got = vidkern.orthogonal_select(x, length, torch.tensor([17], device=dev), backend=backend)
    assert got.tolist() == [[17] + [i for i in range(length) if i != 17]]


def test_select_meta_tokens_with_scores_and_strided_input(kernels):
    """The candidates (K = ceil(1.5 * 20) = 30 from the largest-norm token) are greedy-optimal; the
    result is exactly the 20 of them with the highest scores, sorted."""
    backend, dev = kernels
    x = torch.randn(2, 30, 45).to(dev).transpose(1, 2)        # (B, L=45, D=30), channel stride != 1
    scores = torch.rand(2, 45).to(dev)
    got = vidkern.select_meta_tokens(x, 20, scores=scores, backend=backend)
    start = R.default_start(x)
    candidates = vidkern.orthogonal_select(x, 30, start, backend=backend)
    assert_greedy_picks(candidates, x, start)
    assert torch.equal(got, R.filter_by_scores(candidates, scores, 20))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 19, 24), (1, 50, 25, 40), (2, 20, 20, 16), (1, 9, 1, 8), (1, 70, 35, 70)])
def test_soft_merge_matches_reference(shape, dtype, merge_kernels, poison):
    backend, dev = merge_kernels
    skip_unsupported(backend, "soft_merge", dev, dtype)
    b, length, lp, d = shape
    u = R.normalize(torch.randn(b, length, d)).to(dev)
    x, e = torch.randn(b, length, d).to(dev), torch.randn(1, length, d).to(dev)
    idx = torch.stack([torch.randperm(length)[:lp] for _ in range(b)]).to(dev)
    check_against_reference(f"{backend} soft_merge",
                            lambda uu, xx, ee: vidkern.soft_merge(uu, idx, xx, ee, 0.7, backend=backend),
                            lambda uu, xx, ee: R.soft_merge(uu, idx, xx, ee.expand(b, -1, -1), 0.7),
                            [u, x, e], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_soft_merge_backward_against_float64(dtype, merge_kernels, monkeypatch):
    """Half-precision gradients at a stage-sized merge (2 x 512 -> 256 tokens, D = 64) with small
    upstream gradients (1e-2). The backward's ``dS ~ |dA| sqrt(D) / (L L')`` (~6e-7 here) is far below
    float16's smallest normal (6.1e-5): cast to float16 as it is for the tensor cores, it lost its
    digits (dU 2.1e-2 off). Judged against float64 — the reference run in float16 would not do,
    it shares the inputs' rounding — each gradient must be within two unit roundoffs of the best
    the dtype can hold: the exact gradient rounded to it (dU, ~2.5e-6, is itself subnormal in
    float16, which alone costs 6.9e-3)."""
    backend, dev = merge_kernels
    skip_unsupported(backend, "soft_merge", dev, dtype)
    if backend == "triton" and dev.type == "cpu":
        from vidkern.kernels import merge
        monkeypatch.setattr(merge, "merge_blocks", lambda dtype: (64, 64, 64, 64))   # few interpreted tile ops
    b = 1 if (backend, dev.type) == ("cuda", "cpu") else 2   # the CPU emulator: about 8 s per batch row
    length, lp, d = 512, 256, 64
    u = R.normalize(torch.randn(b, length, d)).to(dtype)
    x, e = torch.randn(b, length, d).to(dtype), torch.randn(b, length, d).to(dtype)
    idx = torch.stack([torch.randperm(length)[:lp].sort().values for _ in range(b)])
    grads = [(1e-2 * torch.randn(b, lp, d)).to(dtype) for _ in range(2)]
    wide = [t.double().requires_grad_() for t in (u, x, e)]
    truth = torch.autograd.grad(R.soft_merge(wide[0], idx, wide[1], wide[2]), wide, [g.double() for g in grads])
    low = [t.to(dev).requires_grad_() for t in (u, x, e)]
    got = torch.autograd.grad(vidkern.soft_merge(low[0], idx.to(dev), low[1], low[2], backend=backend), low,
                              [g.to(dev) for g in grads])
    unit = torch.finfo(dtype).eps / 2
    for name, g, t in zip(("dU", "dX", "dE"), got, truth):
        err, best = rel_err(g.cpu(), t), rel_err(t.to(dtype), t)
        assert err <= best + 2 * unit, f"{name}: relative error {err:.3g} > {best:.3g} (exact rounded) + 2 * {unit:.2g}"


def test_soft_merge_strided_inputs_and_stride0_grads(merge_kernels):
    backend, dev = merge_kernels
    b, length, lp, d = 2, 33, 17, 24
    u = R.normalize(torch.randn(b, d, length).transpose(1, 2)).to(dev).requires_grad_()
    xe = torch.randn(b, length, 3 * d).to(dev)
    x, e = xe[..., :d].requires_grad_(), xe[..., d:2 * d].requires_grad_()   # views of a fused projection
    idx = vidkern.select_meta_tokens(x.detach(), lp)
    a, p = vidkern.soft_merge(u, idx, x, e, backend=backend)
    (a.sum() + p.sum()).backward()                                           # stride-0 gradients
    ur, xr, er = (t.detach().double().requires_grad_() for t in (u, x, e))
    ar, pr = R.soft_merge(ur, idx, xr, er)
    (ar.sum() + pr.sum()).backward()
    torch.testing.assert_close(a.double(), ar, rtol=1e-5, atol=1e-5)
    for got, want in ((u.grad, ur.grad), (x.grad, xr.grad), (e.grad, er.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lp, d", [(200, 16), (20, 64)], ids=["streamed", "materialised"])
def test_soft_merge_never_allocates_the_token_by_meta_matrix(kernels, lp, d):
    """Memory stays O(L D): never an ``L x L'`` tensor as long as ``L' > 2 D`` (the Triton launcher
    materialises ``(L, L')`` scores only while ``L' <= 2 D``, ``kernels.limits.merge_materialises``;
    here ``L' < D``, within the token-sized bound)."""
    backend, dev = kernels
    b, length = 1, 400
    u = R.normalize(torch.randn(b, length, d)).to(dev)
    x, e = torch.randn(b, length, d).to(dev), torch.randn(b, length, d).to(dev)
    idx = vidkern.select_meta_tokens(x, lp)
    be = dispatch.get(backend)
    with LargestTensor() as probe:
        a, p, row_lse, col_sum = be.soft_merge_forward(u, idx, x, e, 1.0)
        be.soft_merge_backward(torch.ones_like(a), p, u, idx, x, e, a, p, row_lse, col_sum, 1.0)
    # 4 L D: Triton's interpreter hands fp32 (L, D) buffers to its kernels as byte views
    limit = (4 if dev.type == "cpu" else 1) * length * d
    assert probe.largest <= limit, f"largest tensor {probe.largest} elements vs L*D={length * d}"
    assert lp < d or probe.largest < length * lp, f"largest tensor {probe.largest} elements vs L*L'={length * lp}"


@pytest.mark.slow
def test_long_clip_at_reduced_size(kernels):
    """The long-clip regime (many token tiles per problem, picks spread over every tile) at a size
    the interpreter / emulator can run: every pick greedy-optimal, merge forward and backward within
    float32 tolerance. (tests/test_scale.py runs L = 12544 on the torch backend.)"""
    backend, dev = kernels
    on_gpu = dev.type == "cuda"
    sel_l, merge_l, d = (12544, 12544, 64) if on_gpu else (384, 256 if backend == "triton" else 1024, 16)
    x = torch.randn(1, sel_l, d)
    start = R.default_start(x)
    assert_greedy_picks(vidkern.orthogonal_select(x.to(dev), sel_l // 2, start.to(dev), backend=backend), x, start)
    x = torch.randn(1, merge_l, d).to(dev)
    idx = vidkern.select_meta_tokens(x, merge_l // 2)
    u, e = R.normalize(torch.randn(1, merge_l, d)).to(dev), torch.randn(1, merge_l, d).to(dev)
    check_against_reference(f"{backend} soft_merge long clip",
                            lambda uu, xx, ee: vidkern.soft_merge(uu, idx, xx, ee, backend=backend),
                            lambda uu, xx, ee: R.soft_merge(uu, idx, xx, ee), [u, x, e], torch.float32)


def test_selection_checker_rejects_non_optimal_picks():
    """The checker itself (vidkern.verify) can fail: it accepts the reference's picks and
    rejects swapped, non-optimal, repeated and wrongly started ones."""
    x = torch.randn(2, 30, 8)
    start = torch.tensor([4, 11])
    picks = R.orthogonal_select(x.double(), 12, start)
    assert_greedy_picks(picks, x, start)

    def rejects(bad, match):
        with pytest.raises(AssertionError, match=match):
            assert_greedy_picks(bad, x, start)
    swapped = picks.clone()
    swapped[1, [3, 7]] = swapped[1, [7, 3]]
    rejects(swapped, "batch row 1, pick 3: token .* scores")
    worst = picks.clone()
    xh = R.normalize(x[0].double())
    unchosen = [n for n in range(30) if n not in picks[0, :5].tolist()]
    worst[0, 5] = max(unchosen, key=lambda n: (xh[picks[0, :5]] @ xh[n]).abs().max().item())
    rejects(worst, "batch row 0, pick 5")
    repeated = picks.clone()
    repeated[0, 6] = repeated[0, 2]
    rejects(repeated, "already picked")
    rejects(torch.roll(picks, 1, dims=1), "start")


def test_selection_checker_accepts_a_near_tie_either_way():
    """Two tokens whose scores differ by 1e-9 (a float32 rounding apart): either pick passes at the
    float32 tolerance; with no tolerance only the better one does."""
    x = torch.tensor([[[1.0, 0.0, 0.0], [1e-3, 1.0, 0.0], [1e-3 + 1e-9, 0.0, 1.0]]], dtype=torch.float64)
    start = torch.tensor([0])
    assert_greedy_picks(torch.tensor([[0, 1, 2]]), x, start, tol=0.0)
    assert_greedy_picks(torch.tensor([[0, 2, 1]]), x, start, tol=1e-5)
    with pytest.raises(AssertionError, match="pick 1: token 2"):
        assert_greedy_picks(torch.tensor([[0, 2, 1]]), x, start, tol=0.0)
