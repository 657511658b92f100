"""The TEAM work model (vidkern.work.team) against the kernels it models, and the model targets.

Agreement: at small ragged shapes (N, D not multiples of the blocks), the formula's launches
equal the interpreter's counted launches — the same Triton kernels in the same order, no torch op
between them, programs exact, bytes within 2% (they agree exactly). Targets, on the formula at
the reference shapes (ViT-B N=1568, D=768, bf16, B=8 and 32; the long clip B=1, N=12544): bytes at
most 1.25x the passes the algorithm needs, at least 264 programs at B=8 in every launch touching
B*N*D data, and no B*N*D-sized scratch.
"""
import pytest
import torch

from vidkern.kernels import team as T
from vidkern.work import MEASURES, MINIMA, Shape, _load_formulas, launches
from vidkern.work.count import interpreting, triton_counts

_load_formulas()
from vidkern.work.team import pass_bytes  # noqa: E402  (registered by _load_formulas)

OPS = ("feature_summary", "team_gate")
DIRECTIONS = ("forward", "backward")
#: (B, N, D, dtype, TARGET_PROGRAMS): ragged shapes; the lowered target of the last makes the row
#: programs loop over several tiles (32 rows of 8) and the column kernels run one split
SMALL = [(1, 37, 24, "fp32", None), (2, 98, 100, "bf16", None), (3, 70, 384, "fp16", None), (2, 130, 200, "bf16", 8)]
VIT_B = [Shape(B=8, N=1568, D=768), Shape(B=32, N=1568, D=768), Shape(B=1, N=12544, D=768)]

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="counting needs TRITON_INTERPRET=1")


def _agree(formula, counted):
    assert [l.kernel for l in formula] == [c.kernel for c in counted]   # no torch op between kernels either
    for f, c in zip(formula, counted):
        assert f.programs == c.programs, f.kernel
        assert abs(f.bytes - c.bytes) <= 0.02 * c.bytes, (f.kernel, f.bytes, c.bytes)
        assert f.macs == c.macs == 0, f.kernel


@needs_interpreter
@pytest.mark.parametrize("case", SMALL, ids=lambda c: "-".join(map(str, c)))
def test_formula_matches_counted(case, monkeypatch):
    b, n, d, dtype, target = case
    if target is not None:
        monkeypatch.setattr(T, "TARGET_PROGRAMS", target)
    shape = Shape(B=b, N=n, D=d, dtype=dtype)
    for op in OPS:
        for direction in DIRECTIONS:
            _agree(launches(op, direction, "triton", shape), MEASURES[(op, "triton")](direction, shape))


@needs_interpreter
def test_agreement_test_catches_a_wrong_formula(monkeypatch):
    """The check above fails when the formula drifts (here: h counted once per program too few)."""
    import vidkern.work.team as W
    shape = Shape(B=2, N=98, D=100, dtype="bf16")
    counted = MEASURES[("team_gate", "triton")]("backward", shape)
    real = W.gate_launches

    def drifted(direction, shape):
        out = real(direction, shape)
        out[1].bytes -= out[1].programs * shape.D * shape.itemsize
        return out
    monkeypatch.setattr(W, "gate_launches", drifted)
    with pytest.raises(AssertionError):
        _agree(launches("team_gate", "backward", "triton", shape), counted)


@pytest.mark.parametrize("shape", VIT_B, ids=lambda s: f"B{s.B}-N{s.N}")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_model_targets(op, direction, shape):
    ls = launches(op, direction, "triton", shape)
    x = shape.B * shape.N * shape.D * shape.itemsize
    total = sum(l.bytes for l in ls)
    assert total <= 1.25 * pass_bytes(op, direction, shape)
    assert pass_bytes(op, direction, shape) >= MINIMA[op](direction, shape)[0]
    assert MINIMA[op](direction, shape)[1] == 0 and all(l.macs == 0 for l in ls)
    big = [l for l in ls if l.bytes >= x]                 # the launches streaming B*N*D data
    small = [l for l in ls if l.bytes < x]
    assert big and all(l.bytes < x / 8 for l in small)    # the rest only touch small partial state
    if shape.B == 8:
        assert all(l.programs >= 264 for l in big), [(l.kernel, l.programs) for l in big]


@pytest.mark.parametrize("shape", VIT_B, ids=lambda s: f"B{s.B}-N{s.N}")
def test_no_full_size_scratch_at_model_shapes(shape):
    """The partial states the launchers allocate, at the reference shapes (sizes from the same
    functions the launchers call): a small fraction of B*N*D elements."""
    b, n, d = shape.B, shape.N, shape.D
    splits, _ = T.summary_splits(b, n, d, forward=True)     # only the forward keeps per-split states
    blocks = -(-n // T.gate_rows(b, n, d))
    for numel in (b * splits * 3 * d, b * blocks * d, b * blocks * 2):
        assert numel <= b * n * d // 16


def test_no_full_size_scratch_allocated():
    """Every tensor the launchers allocate besides their outputs is far from B*N*D elements, at a
    shape whose row programs are the fewest rows allowed (the worst case)."""
    b, n, d = 2, 300, 200
    x, h, dy = torch.randn(b, n, d), torch.randn(b, d), torch.randn(b, n, d)
    allocated = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__.startswith("empty"):
                allocated.append(out.numel())
            return out
    with Record():
        f, stats = T.feature_summary_forward(x)
        T.feature_summary_backward(h, x, f, stats)
        y, s = T.team_gate_forward(x, h)
        T.team_gate_backward(dy, x, h, s)
    full = [a for a in allocated if a == b * n * d]
    assert len(full) == 3                                 # dX (twice) and Y: outputs
    assert max(a for a in allocated if a != b * n * d) <= b * n * d // 4


@needs_interpreter
def test_long_splits_and_row_loops_match_the_reference(monkeypatch):
    """Many token splits merged in order (feature_summary) and row programs over several tiles
    (team_gate), both directions, against the float64 reference."""
    from vidkern import reference as R
    monkeypatch.setattr(T, "TARGET_PROGRAMS", 8)          # summary: 3 splits of 128 tokens (2 tiles) each
    x, h, df, dy = torch.randn(2, 300, 100) * 2, torch.randn(2, 100), torch.randn(2, 100), torch.randn(2, 300, 100)
    assert T.summary_splits(2, 300, 100) == (3, 128)
    f, stats = T.feature_summary_forward(x)
    xr = x.double().requires_grad_()
    fr = R.feature_summary(xr)
    torch.testing.assert_close(f.double(), fr, rtol=1e-5, atol=1e-5)
    (dxr,) = torch.autograd.grad(fr, xr, df.double())
    torch.testing.assert_close(T.feature_summary_backward(df, x, f, stats).double(), dxr, rtol=1e-5, atol=1e-5)
    # the forward's splits: 128 tokens each, walked 4 a step; 303 tokens leave a last split of 47
    # (11 steps and 3 single tokens), and 130 channels a masked second block of 2
    assert T.summary_splits(2, 300, 100, forward=True) == (3, 128)
    xt = torch.randn(2, 303, 130) * 3
    assert T.summary_splits(2, 303, 130, forward=True) == (3, 128)
    torch.testing.assert_close(T.feature_summary_forward(xt)[0].double(), R.feature_summary(xt.double()),
                               rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(T, "TARGET_PROGRAMS", 1)          # gate: 32 rows (4 tiles of 8) a program
    assert T.gate_rows(2, 300, 100) == 32
    y, s = T.team_gate_forward(x, h)
    xr, hr = x.double().requires_grad_(), h.double().requires_grad_()
    yr = R.team_gate(xr, hr)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-6)
    dxr, dhr = torch.autograd.grad(yr, (xr, hr), dy.double())
    dx, dh = T.team_gate_backward(dy, x, h, s)
    torch.testing.assert_close(dx.double(), dxr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh.double(), dhr, rtol=1e-5, atol=1e-5)
