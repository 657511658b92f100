"""TEAM's fused ops (SPEC §2) and STTM's selection and soft merge (SPEC §3).

Providers: ``reference`` (eager; for selection a Python loop over problems and picks, as in
Motionformer's code), ``triton`` (TEAM's fused kernels), ``torch`` (vidkern's backend),
``compile`` (torch.compile of the reference).
"""
import functools

import pytest
import torch

import vidkern
from vidkern import reference as R
from cases import BATCH, DEVICE, DTYPE, N, SIZES
from conftest import INTERPRET, MODES, note_provider, skip_provider


@functools.lru_cache(maxsize=None)
def compiled(fn):
    return torch.compile(fn, dynamic=False)


def team(x, backend):
    if backend == "compile":
        return compiled(lambda a: R.team_gate(a, R.feature_summary(a)))(x)
    return vidkern.team_gate(x, vidkern.feature_summary(x, backend=backend), backend=backend)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["reference", "triton", "torch", "compile"])
def test_team(measure, provider, size, mode):
    if provider == "triton" and DEVICE == "cpu":
        if not INTERPRET:
            skip_provider("triton", "needs a CUDA device (VIDKERN_BENCH_INTERPRET=1 times Triton's interpreter on CPU)")
        note_provider("triton", "Triton's interpreter on CPU (numpy per tile): a correctness run, not a GPU timing")
    x = torch.randn(BATCH, N, SIZES[size]["dim"], device=DEVICE, dtype=DTYPE, requires_grad=mode != "fwd")
    elt = x.numel() * x.element_size()
    measure(lambda a: team(a, provider), (x,), case=f"team ViT-{size} B={BATCH} {mode}", provider=provider, mode=mode,
            flops={"fwd": 0, "bwd": 0}, nbytes={"fwd": 2 * elt, "bwd": 3 * elt}, dtype=DTYPE)


def merge(u, x, e, idx, backend):
    if backend == "compile":
        return compiled(R.soft_merge)(u, idx, x, e)
    return vidkern.soft_merge(u, idx, x, e, backend=backend)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["reference", "torch", "compile"])
def test_soft_merge(measure, provider, size, mode):
    """Spatio-temporal stage: (B, N/2, D) -> N/4 meta tokens (784 -> 392 for 16x224 clips)."""
    d, length = SIZES[size]["dim"], N // 2
    lp = length // 2
    grad = mode != "fwd"
    u = R.normalize(torch.randn(BATCH, length, d, device=DEVICE, dtype=DTYPE)).requires_grad_(grad)
    x, e = [torch.randn(BATCH, length, d, device=DEVICE, dtype=DTYPE, requires_grad=grad) for _ in range(2)]
    idx = vidkern.select_meta_tokens(x, lp)
    macs = BATCH * length * lp * 3 * d
    elt = x.numel() * x.element_size()
    # bytes: forward reads u, x, e, writes a and p (L'/L = 1/2 of one input each); backward reads
    # u, x, e and dA, dP, writes du, dx, de.
    measure(lambda a, b, c: merge(a, b, c, idx, provider), (u, x, e),
            case=f"soft_merge ViT-{size} B={BATCH} {length}->{lp} {mode}", provider=provider, mode=mode,
            flops={"fwd": 2 * macs, "bwd": 2 * macs * 7 / 3}, nbytes={"fwd": 3 * elt + elt, "bwd": 7 * elt},
            dtype=DTYPE)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["reference", "torch"])
def test_select(measure, provider, size):
    """Spatial stage: each of B*T frames, Hp*Wp tokens -> half of them."""
    from cases import GRID
    t, hw = GRID[0], GRID[1] * GRID[2]
    x = torch.randn(BATCH * t, hw, SIZES[size]["dim"], device=DEVICE, dtype=DTYPE)
    k = hw // 2
    fn = ((lambda a: R.select_meta_tokens(a, k)) if provider == "reference"
          else (lambda a: vidkern.select_meta_tokens(a, k, backend="torch")))
    measure(fn, (x,), case=f"select ViT-{size} {BATCH * t}x{hw}->{k} fwd", provider=provider, mode="fwd",
            flops={"fwd": 2 * BATCH * t * (k - 1) * hw * x.shape[-1], "bwd": 0},
            nbytes={"fwd": x.numel() * x.element_size(), "bwd": 0}, dtype=DTYPE)
