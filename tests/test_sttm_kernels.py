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
from test_scale import LargestTensor

GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["triton", "cuda"])
def kernels(request, monkeypatch):
    """(backend name, device) of the kernels under test."""
    if request.param == "cuda":
        return "cuda", request.getfixturevalue("cuda_kernel_device")
    device = torch.device("cuda" if GPU else "cpu")
    reasons = dispatch.get("triton").not_supported_reasons("soft_merge", device, torch.float32, forced=True)
    if reasons:
        pytest.skip("; ".join(reasons))
    if not GPU:
        from vidkern.kernels import sttm
        monkeypatch.setattr(sttm, "SELECT_BLOCKS", (16, 16))
        monkeypatch.setattr(sttm, "merge_blocks", lambda dtype: (16, 16, 16, 16))
    return "triton", device


def skip_interpreted_bf16_dot(backend, dtype):
    if backend == "triton" and not GPU and dtype == torch.bfloat16:
        pytest.skip("Triton 3.8's interpreter computes tl.dot on bfloat16 wrongly (see test_triton_hsda.py)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 49, 24, 24), (1, 1, 8, 1), (2, 37, 40, 37), (3, 70, 17, 35)])
def test_selection_equals_the_reference(shape, dtype, kernels):
    """The indices are discrete: they must equal the reference's exactly (cosines in fp32)."""
    backend, dev = kernels
    b, length, d, k = shape
    x = torch.randn(b, length, d).to(dtype).to(dev)
    start = torch.randint(0, length, (b,)).to(dev)
    got = vidkern.orthogonal_select(x, k, start, backend=backend)
    assert got.dtype == torch.long and got.shape == (b, k)
    assert torch.equal(got.cpu(), R.orthogonal_select(x.double(), k, start).cpu())


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


def test_select_meta_tokens_with_scores_and_strided_input(kernels):
    backend, dev = kernels
    x = torch.randn(2, 30, 45).to(dev).transpose(1, 2)        # (B, L=45, D=30), channel stride != 1
    scores = torch.rand(2, 45).to(dev)
    got = vidkern.select_meta_tokens(x, 20, scores=scores, backend=backend)
    assert torch.equal(got.cpu(), R.select_meta_tokens(x.double(), 20, scores=scores.double()).cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 19, 24), (1, 50, 25, 40), (2, 20, 20, 16), (1, 9, 1, 8), (1, 70, 35, 70)])
def test_soft_merge_matches_reference(shape, dtype, kernels, poison):
    backend, dev = kernels
    skip_interpreted_bf16_dot(backend, dtype)
    b, length, lp, d = shape
    u = R.normalize(torch.randn(b, length, d)).to(dev)
    x, e = torch.randn(b, length, d).to(dev), torch.randn(1, length, d).to(dev)
    idx = torch.stack([torch.randperm(length)[:lp] for _ in range(b)]).to(dev)
    check_against_reference(f"{backend} soft_merge",
                            lambda uu, xx, ee: vidkern.soft_merge(uu, idx, xx, ee, 0.7, backend=backend),
                            lambda uu, xx, ee: R.soft_merge(uu, idx, xx, ee.expand(b, -1, -1), 0.7),
                            [u, x, e], dtype)


def test_soft_merge_strided_inputs_and_stride0_grads(kernels):
    backend, dev = kernels
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


def test_soft_merge_never_allocates_the_token_by_meta_matrix(kernels):
    backend, dev = kernels
    b, length, lp, d = 1, 400, 200, 16
    u = R.normalize(torch.randn(b, length, d)).to(dev)
    x, e = torch.randn(b, length, d).to(dev), torch.randn(b, length, d).to(dev)
    idx = vidkern.select_meta_tokens(x, lp)
    be = dispatch.get(backend)
    with LargestTensor() as probe:
        a, p, row_lse, col_sum = be.soft_merge_forward(u, idx, x, e, 1.0)
        be.soft_merge_backward(torch.ones_like(a), p, u, idx, x, e, a, p, row_lse, col_sum, 1.0)
    # 4 L D: Triton's interpreter hands fp32 (L, D) buffers to its kernels as byte views
    limit = (4 if dev.type == "cpu" else 1) * length * d
    assert probe.largest <= limit < length * lp, f"largest tensor {probe.largest} elements vs L*L'={length * lp}"


@pytest.mark.slow
def test_long_clip_at_reduced_size(kernels):
    """The long-clip regime (many token tiles per problem, picks spread over every tile) at a size
    the interpreter / emulator can run: selection equals the reference, merge forward and backward
    are within float32 tolerance. (tests/test_scale.py runs L = 12544 on the torch backend.)"""
    backend, dev = kernels
    on_gpu = dev.type == "cuda"
    sel_l, merge_l, d = (12544, 12544, 64) if on_gpu else (384, 256 if backend == "triton" else 1024, 16)
    x = torch.randn(1, sel_l, d).to(dev)
    start = R.default_start(x)
    picks = vidkern.orthogonal_select(x, sel_l // 2, start, backend=backend)
    want = (R.orthogonal_select(x.double(), sel_l // 2, start) if not on_gpu
            else dispatch.get("torch").orthogonal_select(x, sel_l // 2, start))
    assert torch.equal(picks, want)
    x = torch.randn(1, merge_l, d).to(dev)
    idx = vidkern.select_meta_tokens(x, merge_l // 2)
    u, e = R.normalize(torch.randn(1, merge_l, d)).to(dev), torch.randn(1, merge_l, d).to(dev)
    check_against_reference(f"{backend} soft_merge long clip",
                            lambda uu, xx, ee: vidkern.soft_merge(uu, idx, xx, ee, backend=backend),
                            lambda uu, xx, ee: R.soft_merge(uu, idx, xx, ee), [u, x, e], torch.float32)
