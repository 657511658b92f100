"""First benchmarks: the torch backend against the reference and the naive alternatives (ViT-S shapes).

On CPU: batch 1, ViT-S (H=6, d=64, 8x14x14 tokens). Attention providers: ``reference`` (dense
masked, eager), ``torch`` (vidkern's per-group path), ``masked_sdpa`` (the naive way: SDPA with a
boolean (N, N) mask), ``global_sdpa`` (plain attention on every head, the cost of not being sparse).
"""
import pytest
import torch
import torch.nn.functional as F

import vidkern
from vidkern import patterns, reference as R

GRID = (8, 14, 14)
N = GRID[0] * GRID[1] * GRID[2]
B, H, D_HEAD, DIM = 1, 6, 64, 384
MODES = ["fwd", "fwd+bwd"]


def attention_flops(num_global_heads, pattern="checkerboard"):
    """2 FLOPs per multiply-add; QK^T and PV over attended pairs: 4 * pairs * d per head."""
    ids = patterns.group_ids(pattern, GRID)
    pairs_sparse = int((torch.bincount(ids).double() ** 2).sum())
    return B * 4 * D_HEAD * (num_global_heads * N * N + (H - num_global_heads) * pairs_sparse)


def _masked_sdpa(q, k, v, hg):
    ids = patterns.group_ids("checkerboard", GRID)
    mask = (ids[:, None] == ids[None]) | (torch.arange(H)[:, None, None] < hg)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


ATTENTION = {
    "reference": lambda q, k, v, hg: vidkern.hsda(q, k, v, GRID, hg, backend="reference"),
    "torch": lambda q, k, v, hg: vidkern.hsda(q, k, v, GRID, hg, backend="torch"),
    "masked_sdpa": _masked_sdpa,
    "global_sdpa": lambda q, k, v, hg: F.scaled_dot_product_attention(q, k, v),
}


def _step(fn, inputs, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    grad = None

    def run():
        nonlocal grad
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        grad = [torch.randn_like(o) for o in out] if grad is None else grad
        torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], grad)
    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hg", [H // 2, 0], ids=["hsda", "sparse_dense"])
@pytest.mark.parametrize("provider", list(ATTENTION))
def test_attention(measure, provider, hg, mode):
    q, k, v = [torch.randn(B, H, N, D_HEAD, requires_grad=True) for _ in range(3)]
    flops = attention_flops(hg) * (1 if mode == "fwd" else 3.5)  # FlashAttention convention: bwd = 2.5x fwd
    if provider == "global_sdpa":
        flops = attention_flops(H) * (1 if mode == "fwd" else 3.5)
    nbytes = 4 * q.numel() * 4 * (1 if mode == "fwd" else 2)
    measure(_step(lambda a, b, c: ATTENTION[provider](a, b, c, hg), (q, k, v), mode),
            case=f"attention {'Hg=3' if hg else 'Hg=0'} {mode}", provider=provider, flops=flops, nbytes=nbytes)


TEAM = {"reference": "reference", "torch": "torch"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(TEAM))
def test_team(measure, provider, mode):
    x = torch.randn(B, N, DIM, requires_grad=True)
    h = torch.randn(B, DIM, requires_grad=True)

    def team(a, b):
        return vidkern.team_gate(a, b, backend=provider) + vidkern.feature_summary(a, backend=provider)[:, None]
    measure(_step(team, (x, h), mode), case=f"team {mode}", provider=provider,
            flops=0, nbytes=4 * x.numel() * (2 if mode == "fwd" else 4))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "torch"])
def test_soft_merge(measure, provider, mode):
    """Spatio-temporal stage of ViT-S STTM: (1, 784, 384) -> 392 meta tokens."""
    length, lp = 784, 392
    u = R.normalize(torch.randn(B, length, DIM)).requires_grad_()
    x, e = torch.randn(B, length, DIM, requires_grad=True), torch.randn(B, length, DIM, requires_grad=True)
    idx = vidkern.select_meta_tokens(x, lp)
    flops = 2 * B * length * lp * (DIM + 2 * DIM) * (1 if mode == "fwd" else 3)
    measure(_step(lambda a, b, c: vidkern.soft_merge(a, idx, b, c, backend=provider), (u, x, e), mode),
            case=f"soft_merge {mode}", provider=provider, flops=flops, nbytes=4 * 3 * u.numel())


@pytest.mark.parametrize("provider", ["reference", "torch"])
def test_select(measure, provider):
    """Spatial stage of ViT-S STTM: 8 frames x 196 tokens -> 98 meta tokens each."""
    x = torch.randn(B * 8, 196, DIM)
    measure(lambda: vidkern.select_meta_tokens(x, 98, backend=provider), case="select 8x196->98",
            provider=provider, flops=2 * 8 * 196 * DIM * 98, nbytes=4 * x.numel())
