"""The STTM selection work model (vidkern.work.selection) against the kernels it models, and the
model targets.

Agreement: at small ragged shapes (L not a multiple of the Gram tile, several tile pairs; with
and without scores; the Gram scratch in chunks; the streaming fallback; K = 1) the formula's Triton
launches equal the interpreter's counted ones — same kernels in the same order, programs exact,
bytes and MACs within 2% (they agree exactly), greedy steps equal. Targets, on the formula at full
size (bf16): no greedy step reads more than O(L) values (per step and program at most
``4 L + 8`` bytes: one float32 Gram row and the pick), and ``model_us`` of the whole op at most
1000 us for sttm_vit_b's stages at B=32 and 30000 us for the long clip.
"""
import pytest

from vidkern.kernels import selection as S
from vidkern.kernels.launch import Config
from vidkern.work import MEASURES, MINIMA, Shape, _load_formulas, launches, records
from vidkern.work.count import interpreting

_load_formulas()
import vidkern.work.selection as W  # noqa: E402  (registered by _load_formulas)

OPS = ("orthogonal_select", "select_meta_tokens")
TINY_GRAM = dict.fromkeys(("half", "fp32"), Config.of(BLOCK=16, BLOCK_D=16, num_warps=4, num_stages=3))
#: (B, L, D, L', scores, dtype, patches): ragged shapes
SMALL = [
    (1, 37, 24, 20, False, "fp32", dict(GRAM_BLOCKS=TINY_GRAM)),
    (2, 64, 64, 30, True, "bf16", dict(GRAM_BLOCKS=TINY_GRAM)),
    (3, 100, 24, 40, True, "fp16", {}),                                   # the real tiles: one 128-row tile
    (3, 37, 24, 20, True, "bf16", dict(GRAM_BLOCKS=TINY_GRAM, GRAM_SCRATCH_BYTES=2 * 4 * 37 * 37)),  # chunks 2, 1
    (2, 49, 24, 24, False, "fp16", dict(GREEDY_MAX_L=32)),                 # the streaming fallback
    (2, 23, 5, 1, False, "fp32", {}),                                     # K = 1: no Gram
]
# sttm_vit_b at B=32, bf16: as the brief gives them (stage 1: 196 -> 147; stage 2: 784 -> 588 with
# scores, K = min(784, 882) = 784) and as vidkern.work.report has them (L' = L/2, with scores)
STAGES = [Shape(B=256, L=196, N=196, num_out=147, D=768), Shape(B=32, L=784, N=784, num_out=588, D=768, scores=True),
          Shape(B=256, L=196, N=196, num_out=98, D=768, scores=True),
          Shape(B=32, L=784, N=784, num_out=392, D=768, scores=True)]
LONG = [Shape(B=1, L=12544, N=12544, num_out=6272, D=768), Shape(B=1, L=12544, N=12544, num_out=6272, D=768, scores=True)]

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="counting needs TRITON_INTERPRET=1")


def _kernels(rows):
    return [r for r in rows if not r.kernel.startswith("aten.")]


def _agree(formula, counted):
    formula, counted = _kernels(formula), _kernels(counted)
    assert [l.kernel for l in formula] == [c.kernel for c in counted]
    for f, c in zip(formula, counted):
        assert f.programs == c.programs, f.kernel
        assert abs(f.bytes - c.bytes) <= 0.02 * c.bytes, (f.kernel, f.bytes, c.bytes)
        assert abs(f.macs - c.macs) <= 0.02 * c.macs, (f.kernel, f.macs, c.macs)
        assert f.steps == c.steps, (f.kernel, f.steps, c.steps)


@needs_interpreter
@pytest.mark.parametrize("case", SMALL, ids=lambda c: "-".join(map(str, c[:6])) + ("-" + "-".join(c[6]) if c[6] else ""))
def test_formula_matches_counted(case, monkeypatch):
    b, length, d, lp, scores, dtype, patches = case
    for name, value in patches.items():
        monkeypatch.setattr(S, name, value)
    monkeypatch.setattr(W, "SCRATCH_BUDGET", S.GRAM_SCRATCH_BYTES)     # the CPU launcher's budget
    shape = Shape(B=b, L=length, N=length, D=d, num_out=lp, scores=scores, dtype=dtype)
    for op in OPS:
        formula = launches(op, "forward", "triton", shape)
        _agree(formula, MEASURES[(op, "triton")]("forward", shape))
        names = [l.kernel for l in _kernels(formula)]
        if "GREEDY_MAX_L" in patches:
            assert names == ["_stream_select_kernel"]
        elif W.candidates(op, shape) == 1:
            assert names == ["_greedy_kernel"]
        else:
            chunks = -(-b // S.chunk_problems(length))
            assert names == ["_inv_norm_kernel"] + ["_gram_kernel", "_greedy_kernel"] * chunks


@needs_interpreter
@pytest.mark.parametrize("drift", ["greedy reads whole rows", "gram stores one triangle", "gram macs"])
def test_agreement_test_catches_a_wrong_formula(drift, monkeypatch):
    """The check above fails when the formula drifts."""
    monkeypatch.setattr(S, "GRAM_BLOCKS", TINY_GRAM)
    shape = Shape(B=2, L=37, N=37, D=24, num_out=20, dtype="fp32")
    counted = MEASURES[("orthogonal_select", "triton")]("forward", shape)
    real = W.select_launches

    def drifted(shape, k):
        out = real(shape, k)
        if drift == "greedy reads whole rows":       # the picked entries of the row counted too
            out[2].bytes += out[2].programs * 4 * k * (k - 1) // 2
        elif drift == "gram stores one triangle":
            out[1].bytes -= shape.B * 4 * shape.L * (shape.L - 16) // 2
        else:
            out[1].macs = out[1].macs * 2 // 3          # "without the diagonal tiles' padding"
        return out

    monkeypatch.setattr(W, "select_launches", drifted)
    with pytest.raises(AssertionError):
        _agree(launches("orthogonal_select", "forward", "triton", shape), counted)


@pytest.mark.parametrize("shape", STAGES + LONG, ids=lambda s: f"B{s.B}-L{s.L}-{s.num_out}-{'scores' if s.scores else 'plain'}")
def test_no_greedy_step_reads_more_than_a_row(shape):
    """Every launch with sequential steps is the register greedy kernel, and one step of one of its
    programs moves at most one float32 Gram row and one pick: the marginal bytes of one more pick,
    on the formula, are at most 4 L + 8 (and the average step less)."""
    for op in OPS:
        k = W.candidates(op, shape)
        for launch in launches(op, "forward", "triton", shape):
            if launch.steps > 1:
                assert launch.kernel == "_greedy_kernel", launch.kernel
                assert launch.bytes / launch.programs / launch.steps <= 4 * shape.L + 8 + 16, launch
        one_more = Shape(**dict(vars(shape), num_out=k + 1))
        greedy = [l for l in launches("orthogonal_select", "forward", "triton", Shape(**dict(vars(shape), num_out=k)))
                  if l.kernel == "_greedy_kernel"]
        greedy_more = [l for l in launches("orthogonal_select", "forward", "triton", one_more) if l.kernel == "_greedy_kernel"]
        per_step = (sum(l.bytes for l in greedy_more) - sum(l.bytes for l in greedy)) / shape.B
        assert 0 < per_step <= 4 * shape.L + 8, per_step
    # the design it replaced re-read X every step: L D bytes and more
    old = W.stream_launches(shape, W.candidates("orthogonal_select", shape))[0]
    assert old.bytes / old.programs / old.steps > shape.L * shape.D * shape.itemsize


@pytest.mark.parametrize("shape", STAGES, ids=lambda s: f"B{s.B}-L{s.L}-{s.num_out}-{'scores' if s.scores else 'plain'}")
def test_sttm_vit_b_stages_within_1000_us(shape):
    for op in OPS:
        total = records(op, "forward", "triton", shape)[-1]
        assert total["model_us"] <= 1000, (op, total["model_us"])
    assert S.chunk_problems(shape.L) >= shape.B            # one Gram chunk: 39 MB / 79 MB of scratch


@pytest.mark.parametrize("shape", LONG, ids=lambda s: "scores" if s.scores else "plain")
def test_long_clip_within_30000_us(shape):
    for op in OPS:
        total = records(op, "forward", "triton", shape)[-1]
        assert total["model_us"] <= 30000, (op, total["model_us"])
        assert total["macs"] <= 1.5 * total["useful_macs"]      # the symmetric Gram: about half of L^2 D


def test_gram_scratch_is_bounded():
    """At most the budget of Gram scratch (GRAM_SCRATCH_BYTES by default), or one problem when a
    problem alone is larger."""
    for budget in (None, 10 ** 6, 5 * 10 ** 9):
        for length in (1, 196, 784, 12544, S.GREEDY_MAX_L):
            per = S.chunk_problems(length, budget)
            assert per >= 1 and (per == 1 or per * 4 * length * length <= (budget or S.GRAM_SCRATCH_BYTES))
    assert 4 * S.GREEDY_MAX_L ** 2 <= S.GRAM_SCRATCH_BYTES                   # the register regime: one problem fits


def test_scratch_budget_is_a_share_of_free_memory(monkeypatch):
    """On CUDA the budget is GRAM_FREE_SHARE of the driver's free memory plus the caching allocator's
    unused blocks (faked here: no GPU needed); elsewhere GRAM_SCRATCH_BYTES."""
    import torch
    assert S.scratch_budget(torch.device("cpu")) == S.GRAM_SCRATCH_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * 2 ** 30, 80 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 12 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    budget = S.scratch_budget(torch.device("cuda", 0))
    assert budget == int(S.GRAM_FREE_SHARE * 32 * 2 ** 30)
    assert S.chunk_problems(12544, budget) == 27                            # 629 MB a problem
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)   # a graph's pool keeps it
    assert S.scratch_budget(torch.device("cuda", 0)) == S.GRAM_SCRATCH_BYTES


def test_a_batch_of_long_clips_is_one_gram_chunk():
    """Eight long clips take 5 GB of Gram scratch: within the free-memory budget, so their greedy
    picks run side by side, one launch (a fixed 2 GiB made it three launches in series: 31.8 ms)."""
    shape = Shape(B=8, L=12544, N=12544, num_out=6272, D=768)
    rows = launches("orthogonal_select", "forward", "triton", shape)
    assert [l.programs for l in rows if l.kernel == "_greedy_kernel"] == [8]
    assert records("orthogonal_select", "forward", "triton", shape)[-1]["model_us"] <= 13000


def test_no_backward_and_minima():
    shape = STAGES[1]
    for op in OPS:
        assert launches(op, "backward", "triton", shape) == []
        assert MEASURES[(op, "triton")]("backward", shape) == []
        min_bytes, useful = MINIMA[op]("forward", shape)
        x = shape.B * shape.L * shape.D * shape.itemsize
        assert x < min_bytes < 1.1 * x and useful > 0
