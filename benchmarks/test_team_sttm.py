"""TEAM's fused ops (SPEC §2) and STTM's selection and soft merge (SPEC §3).

Providers: ``reference`` (eager; for selection a Python loop over problems and picks, as in
Motionformer's code), ``triton`` and ``cuda`` (TEAM's fused Triton / CUDA C++ kernels), ``torch``
(vidkern's backend), ``auto`` (``backend=None``: what a user gets, ``vidkern.dispatch``'s choice),
``compile`` (torch.compile of the reference).

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
from conftest import INTERPRET, MODES, QUICK, note_provider, skip_provider, work_shape

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
    backend = None if backend == "auto" else backend
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
@pytest.mark.parametrize("provider", ["reference", "cuda", "triton", "torch", "auto", "compile"])
def test_team(measure, provider, op, size, batch, mode):
    _team_provider_usable(provider)
    d = SIZES[size]["dim"]
    grad = mode != "fwd"
    x = torch.randn(batch, N, d, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    h = torch.randn(batch, d, device=DEVICE, dtype=DTYPE, requires_grad=grad and op == "team_gate")
    elt = x.numel() * x.element_size()
    fwd, bwd = TEAM_TRAFFIC[op]
    shape = work_shape(B=batch, N=N, L=N, D=d, dtype=DTYPE)
    calls = [(o, shape) for o in (("feature_summary", "team_gate") if op == "team" else (op,))]
    measure(lambda a, b: team(op, a, b, provider), (x, h), case=f"{op} ViT-{size} B={batch} {mode}",
            provider=provider, mode=mode, flops={"fwd": 0, "bwd": 0}, nbytes={"fwd": fwd * elt, "bwd": bwd * elt},
            dtype=DTYPE, work=calls)


# STTM stages: (problems, L, L', D). ViT's two stages (spatial: each frame's Hp*Wp tokens -> half;
# spatio-temporal: the N/2 survivors -> N/4) and a long clip (64 frames of 224x224, ViT-B width).
LONG_CLIP = (1, 12544, 6272, 768)


def sttm_stages():
    from cases import GRID
    t, hw = GRID[0], GRID[1] * GRID[2]
    stages = {}
    for size, cfg in SIZES.items():
        stages[f"spatial ViT-{size}"] = (BATCH * t, hw, hw // 2, cfg["dim"])
        stages[f"spatio-temporal ViT-{size}"] = (BATCH, N // 2, N // 4, cfg["dim"])
    if not QUICK:
        stages["long clip"] = LONG_CLIP
    return stages


STAGES = sttm_stages()


def _sttm_provider_usable(provider, stage):
    _team_provider_usable(provider)   # the same GPU / extension conditions
    if stage == "long clip" and DEVICE == "cpu" and provider == "compile":
        skip_provider("compile", "long clip on CPU: compiling the materialised reference at L x L' = 78.7M is "
                                 "left to GPU runs")


def merge(u, x, e, idx, backend):
    if backend == "compile":
        return compiled(R.soft_merge)(u, idx, x, e)
    return vidkern.soft_merge(u, idx, x, e, backend=None if backend == "auto" else backend)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("provider", ["reference", "cuda", "triton", "torch", "auto", "compile"])
def test_soft_merge(measure, provider, stage, mode):
    """(problems, L, D) -> L' meta tokens: A = C^T X and P = C^T E."""
    if stage == "long clip" and DEVICE == "cpu" and mode != "fwd+bwd":
        pytest.skip("long clip on CPU: forward+backward only (minutes per mode)")
    _sttm_provider_usable(provider, stage)
    b, length, lp, d = STAGES[stage]
    grad = mode != "fwd"
    u = R.normalize(torch.randn(b, length, d, device=DEVICE, dtype=DTYPE)).requires_grad_(grad)
    x, e = [torch.randn(b, length, d, device=DEVICE, dtype=DTYPE, requires_grad=grad) for _ in range(2)]
    idx = vidkern.select_meta_tokens(x, lp)
    macs = b * length * lp * 3 * d
    elt = x.numel() * x.element_size()
    out = b * lp * d * x.element_size()
    # bytes: forward reads u, x, e and writes A and P; backward reads u, x, e, dA, dP (and A, P)
    # and writes du, dx, de.
    measure(lambda a, bb, c: merge(a, bb, c, idx, provider), (u, x, e),
            case=f"soft_merge {stage} {b}x{length}->{lp} D={d} {mode}", provider=provider, mode=mode,
            flops={"fwd": 2 * macs, "bwd": 2 * macs * 7 / 3}, nbytes={"fwd": 3 * elt + 2 * out,
                                                                      "bwd": 6 * elt + 4 * out},
            dtype=DTYPE, work=[("soft_merge", work_shape(B=b, L=length, N=length, num_out=lp, D=d, dtype=DTYPE))])


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("provider", ["reference", "cuda", "triton", "torch", "auto"])
def test_select(measure, provider, stage):
    """Greedy most-orthogonal selection of L' of L tokens per problem. ``reference``: a Python loop
    over problems and picks on the (L, L) cosine matrix; ``torch``: Motionformer's style, a Python
    loop over the K picks with a few batched kernels each; ``triton``/``cuda``: one launch."""
    _sttm_provider_usable(provider, stage)
    if provider == "reference" and stage == "long clip":
        skip_provider("reference (long clip)", "the reference loop is O(K^2 L) on an (L, L) matrix: hours at L = 12544")
    b, length, lp, d = STAGES[stage]
    x = torch.randn(b, length, d, device=DEVICE, dtype=DTYPE)
    fn = ((lambda a: R.select_meta_tokens(a, lp)) if provider == "reference"
          else (lambda a: vidkern.select_meta_tokens(a, lp, backend=None if provider == "auto" else provider)))
    measure(fn, (x,), case=f"select {stage} {b}x{length}->{lp} D={d} fwd", provider=provider, mode="fwd",
            flops={"fwd": 2 * b * (lp - 1) * length * d, "bwd": 0},
            nbytes={"fwd": x.numel() * x.element_size(), "bwd": 0}, dtype=DTYPE,
            work=[("select_meta_tokens", work_shape(B=b, L=length, N=length, num_out=lp, D=d, dtype=DTYPE))])
