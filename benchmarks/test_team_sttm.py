"""TEAM's fused ops (SPEC §2) and STTM's selection and soft merge (SPEC §3).

Providers: ``reference`` (eager; for selection a Python loop over problems and picks, as in
Motionformer's code), ``triton`` and ``cuda`` (TEAM's fused Triton / CUDA C++ kernels), ``torch``
(vidkern's backend), ``compile`` (torch.compile of the reference).

TEAM's bytes are the minimum any implementation must move (SPEC §2): forward reads X once and
writes Y once; backward reads X and dY once and writes dX once (the (B, D) and (B, N) vectors are
negligible). On GPU, ViT-S/B at B = 8 and 32 (N = 1568), each op alone and the pair.
"""
import functools

import pytest
import torch

import vidkern
from vidkern import reference as R
from cases import BATCH, DEVICE, DTYPE, GPU, N, SIZES
from conftest import INTERPRET, MODES, QUICK, note_provider, skip_provider

TEAM_BATCHES = (8, 32) if GPU and not QUICK else (BATCH,)
TEAM_OPS = ("feature_summary", "team_gate", "team") if GPU and not QUICK else ("team",)
# elements of X moved per op: (forward, backward)
TEAM_TRAFFIC = {"feature_summary": (1, 2), "team_gate": (2, 3), "team": (2, 3)}


@functools.lru_cache(maxsize=None)
def compiled(fn):
    return torch.compile(fn, dynamic=False)


REFERENCE_TEAM = {"feature_summary": lambda a, h: R.feature_summary(a), "team_gate": R.team_gate,
                  "team": lambda a, h: R.team_gate(a, R.feature_summary(a))}


def team(op, x, h, backend):
    if backend == "compile":
        return compiled(REFERENCE_TEAM[op])(x, h)
    if op == "feature_summary":
        return vidkern.feature_summary(x, backend=backend)
    if op == "team_gate":
        return vidkern.team_gate(x, h, backend=backend)
    return vidkern.team_gate(x, vidkern.feature_summary(x, backend=backend), backend=backend)


def _team_provider_usable(provider):
    if provider == "triton" and DEVICE == "cpu":
        if not INTERPRET:
            skip_provider("triton", "needs a CUDA device (VIDKERN_BENCH_INTERPRET=1 times Triton's interpreter on CPU)")
        note_provider("triton", "Triton's interpreter on CPU (numpy per tile): a correctness run, not a GPU timing")
    if provider == "cuda":
        from vidkern.backends import cuda
        if cuda.extension_error():
            skip_provider("cuda", cuda.extension_error())
        if DEVICE == "cpu":
            skip_provider("cuda", "needs a CUDA device (on CPU the CUDA kernels run only in the emulator, "
                                  "one OS thread per CUDA thread: a correctness tool, not a timing)")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", TEAM_BATCHES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op", TEAM_OPS)
@pytest.mark.parametrize("provider", ["reference", "cuda", "triton", "torch", "compile"])
def test_team(measure, provider, op, size, batch, mode):
    _team_provider_usable(provider)
    d = SIZES[size]["dim"]
    grad = mode != "fwd"
    x = torch.randn(batch, N, d, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    h = torch.randn(batch, d, device=DEVICE, dtype=DTYPE, requires_grad=grad and op == "team_gate")
    elt = x.numel() * x.element_size()
    fwd, bwd = TEAM_TRAFFIC[op]
    measure(lambda a, b: team(op, a, b, provider), (x, h), case=f"{op} ViT-{size} B={batch} {mode}",
            provider=provider, mode=mode, flops={"fwd": 0, "bwd": 0}, nbytes={"fwd": fwd * elt, "bwd": bwd * elt},
            dtype=DTYPE)


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
