"""The work model of the soft-merge Triton kernels (vidkern.work.merge): formula against the
interpreter's counts at small ragged shapes, and the design targets at the reference shapes.

The counted runs use the launchers' real tiles (16 x 16 score tiles, 128-channel chunks), and
lowered chunk limits for the channel groups (several programs per tile, an idle padding chunk)."""
import pytest
import torch

import vidkern
from vidkern import reference as R
from vidkern.work import MEASURES, Shape, launches, total
from tolerance import check_against_reference

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="counts run in Triton's interpreter (CPU)"),
              pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]  # bf16 interpreted dots

SMALL = [  # (B, L, L', D, dtype): L, L' not multiples of the 16-row tiles
    (2, 37, 19, 24, "fp32"),   # these three keep the backward's scores (merge.stores_scores)
    (1, 50, 25, 40, "fp16"),
    (2, 33, 17, 64, "bf16"),   # counting bf16 is fine; its interpreted values are not checked
    (2, 45, 30, 16, "fp32"),   # these two recompute S and G in every backward pass
    (1, 41, 35, 24, "fp16"),
]


def test_small_shapes_cover_both_backward_designs():
    from vidkern.kernels.merge import stores_scores
    kept = [stores_scores(lp, d, Shape(dtype=dt).itemsize) for _, _, lp, d, dt in SMALL]
    assert kept == [True, True, True, False, False]


def _agree(formula, counted):
    """Same Triton kernels in the same order, programs exact, bytes and MACs within 2%."""
    kernels = [f for f in formula if not f.kernel.startswith("aten.")]
    seen = [c for c in counted if not c.kernel.startswith("aten.")]
    assert [k.kernel for k in kernels] == [c.kernel for c in seen]
    for f, c in zip(kernels, seen):
        assert f.programs == c.programs, (f.kernel, f.programs, c.programs)
        for what in ("bytes", "macs"):
            want, got = getattr(f, what), getattr(c, what)
            assert abs(want - got) <= 0.02 * max(got, 1), f"{f.kernel} {what}: formula {want} vs counted {got}"


def _check(shape, direction):
    _agree(launches("soft_merge", direction, "triton", shape), MEASURES[("soft_merge", "triton")](direction, shape))


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("b, length, lp, d, dtype", SMALL)
def test_formula_matches_counts(b, length, lp, d, dtype, direction):
    _check(Shape(B=b, L=length, num_out=lp, D=d, dtype=dtype), direction)


@pytest.fixture
def small_chunks(monkeypatch):
    """16-channel chunks, 1 or 2 resident: D = 40 is 3 chunks in 2 groups (one idle chunk)."""
    from vidkern.kernels import merge
    for key in ("half", "fp32"):
        monkeypatch.setitem(merge.MERGE_BLOCKS, key, dict(merge.MERGE_BLOCKS[key], CH=16))
        monkeypatch.setitem(merge.MERGE_CHUNKS, key, (1, 2))
    return merge


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_formula_matches_counts_with_channel_groups(small_chunks, direction):
    shape = Shape(B=2, L=29, num_out=21, D=40, dtype="fp16")
    assert small_chunks.channel_split(40, 16, (1, 2)) == (2, 2)
    _check(shape, direction)


def test_the_agreement_check_can_fail():
    shape = Shape(B=1, L=37, num_out=19, D=24, dtype="fp32")
    counted = MEASURES[("soft_merge", "triton")]("backward", shape)
    formula = launches("soft_merge", "backward", "triton", shape)
    _agree(formula, counted)
    formula[1].macs = int(formula[1].macs * 1.03)          # a formula 3% off
    with pytest.raises(AssertionError):
        _agree(formula, counted)


@pytest.mark.parametrize("stored", [True, False], ids=["stored-scores", "recomputed"])
def test_channel_groups_match_reference(small_chunks, poison, monkeypatch, stored):
    """Several programs per tile (and an idle chunk) write every output element correctly, with the
    backward's scores kept from the token pass or recomputed in every pass."""
    monkeypatch.setattr(small_chunks, "stores_scores", lambda *a: stored)
    b, length, lp, d = 2, 29, 21, 40
    u = R.normalize(torch.randn(b, length, d))
    x, e = torch.randn(b, length, d), torch.randn(b, length, d)
    idx = torch.stack([torch.randperm(length)[:lp] for _ in range(b)])
    check_against_reference("triton soft_merge channel groups",
                            lambda uu, xx, ee: vidkern.soft_merge(uu, idx, xx, ee, 0.7, backend="triton"),
                            lambda uu, xx, ee: R.soft_merge(uu, idx, xx, ee, 0.7), [u, x, e], torch.float16)


REFERENCE = {  # sttm_vit_b's two stages and the long clip
    "stage1": dict(B=256, L=196, num_out=147),
    "stage2": dict(B=32, L=784, num_out=588),
    "long_clip": dict(B=1, L=12544, num_out=6272),
}


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("d", [384, 768])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_model_targets_at_the_reference_shapes(name, d, direction):
    """S and G are computed once per (token tile, meta tile) per pass: issued MACs at most twice
    the useful ones (ragged 16-row tiles included)."""
    t = total("soft_merge", direction, "triton", Shape(D=d, dtype="bf16", **REFERENCE[name]))
    assert t["macs"] <= 2 * t["useful_macs"], f"{name} D={d} {direction}: {t['macs'] / t['useful_macs']:.3f}"
