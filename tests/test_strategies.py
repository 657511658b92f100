"""HSDA's strategies (vidkern.sdpa: fused, split, views) and grouped token order, against the
float64 reference run on natural-order tokens and permuted: every strategy, both token orders,
every pattern kind (even and odd checkerboard grids, temporal, an explicit pattern with an unused
id and groups of several sizes), forward and every input gradient."""
import pytest
import torch

import vidkern
from vidkern import patterns, reference as R, sdpa
from tolerance import check_against_reference

DTYPES = [torch.float32, torch.bfloat16]


def _explicit(n):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 5, (n,), generator=g)
    ids[ids == 3] = 4                                   # id 3 unused: an empty group
    return ids


CASES = [  # (grid, pattern, hg, heads)
    ((2, 4, 4), "checkerboard", 2, 4),    # equal halves: one SDPA call over a view
    ((2, 3, 5), "checkerboard", 1, 3),    # odd grid: two runs of unequal size
    ((4, 2, 3), "temporal", 1, 2),        # 6 groups of T = 4
    ((1, 5, 6), "explicit", 2, 3),
    ((3, 1, 1), "checkerboard", 1, 2),    # a 1x1 spatial grid: one group
    ((2, 4, 4), "checkerboard", 3, 3),    # every head global
]
IDS = ["checkerboard-even", "checkerboard-odd", "temporal", "explicit", "one-cell", "all-global"]


def _pattern(pattern, grid):
    n = grid[0] * grid[1] * grid[2]
    return _explicit(n) if pattern == "explicit" else pattern


def _grouped_reference(grid, hg, pat):
    """The natural-order reference on tokens moved back from grouped order, and its output moved
    to grouped order: independent of how the op handles grouped tokens."""
    perm, _ = patterns.grouped_order(pat, grid, "cpu")
    inv = torch.argsort(perm)

    def ref(q, k, v):
        back = [t[:, :, inv] for t in (q, k, v)]
        return R.hsda(*back, grid, hg, pat)[:, :, perm]
    return ref


def _inputs(grid, heads):
    return [torch.randn(2, heads, grid[0] * grid[1] * grid[2], 16) for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", sdpa.STRATEGIES)
@pytest.mark.parametrize("grid, pattern, hg, heads", CASES, ids=IDS)
def test_grouped_order_matches_reference(grid, pattern, hg, heads, strategy, dtype):
    pat = _pattern(pattern, grid)
    check_against_reference(f"hsda grouped {pattern} {strategy}",
                            lambda q, k, v: vidkern.hsda(q, k, v, grid, hg, pat, token_order="grouped",
                                                         strategy=strategy),
                            _grouped_reference(grid, hg, pat), _inputs(grid, heads), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", ["fused", "split"])
@pytest.mark.parametrize("grid, pattern, hg, heads", CASES, ids=IDS)
def test_natural_order_strategies_match_reference(grid, pattern, hg, heads, strategy, dtype):
    pat = _pattern(pattern, grid)
    check_against_reference(f"hsda natural {pattern} {strategy}",
                            lambda q, k, v: vidkern.hsda(q, k, v, grid, hg, pat, strategy=strategy),
                            lambda q, k, v: R.hsda(q, k, v, grid, hg, pat), _inputs(grid, heads), dtype)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_grouped_order_on_a_forced_backend(backend):
    """A forced backend runs strategy "fused" on the grouped tokens (as an explicit pattern)."""
    grid, hg, pat = (2, 3, 5), 1, "checkerboard"
    inputs = [torch.randn(1, 2, 30, 8) for _ in range(3)]
    check_against_reference(f"hsda grouped {backend}",
                            lambda q, k, v: vidkern.hsda(q, k, v, grid, hg, pat, backend=backend,
                                                         token_order="grouped"),
                            _grouped_reference(grid, hg, pat), inputs, torch.float32)


def test_grouped_order_permutation():
    """Group 0's tokens first, each group in natural order; grouped ids sorted."""
    grid = (2, 3, 3)
    ids = patterns.group_ids("checkerboard", grid)
    perm, grouped = patterns.grouped_order("checkerboard", grid, "cpu")
    assert sorted(perm.tolist()) == list(range(18))
    assert torch.equal(grouped, ids[perm]) and torch.equal(grouped, grouped.sort().values)
    for g in (0, 1):
        members = perm[grouped == g]
        assert torch.equal(members, members.sort().values)
    assert patterns.group_sizes("checkerboard", grid) == (10, 8)
    assert patterns.group_sizes("temporal", grid) == (2,) * 9
    assert patterns.group_sizes(torch.tensor([0, 2, 2, 0, 2]), None) == (2, 3)   # id 1 has no token


def test_views_fold_without_copies():
    """The views strategy folds equal groups into a batch axis as a view, for (B, H, N, d) tensors
    and for (B, N, H, d) views of a fused qkv projection alike."""
    b, h, n, d = 2, 3, 8, 4
    contiguous = torch.randn(b, h, n, d)
    fused = torch.randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4)[0]
    for t in (contiguous, fused):
        folded, unfold = sdpa._fold(t, 2, n // 2)
        assert folded.data_ptr() == t.data_ptr() and folded.shape[-2:] == (n // 2, d)
        assert folded._base is not None                            # a view
        assert torch.equal(unfold(folded), t)
    assert sdpa._runs([3, 3, 0, 2, 3]) == [(0, 2, 3), (6, 1, 2), (8, 1, 3)]


def test_strategy_rule_and_bad_arguments():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sdpa.default_strategy(cpu, "natural") == sdpa.default_strategy(cuda, "natural") == "split"
    assert sdpa.default_strategy(cpu, "grouped") == sdpa.default_strategy(cuda, "grouped") == "views"
    # small groups (temporal heads at T = 8) go to the packed Triton kernel on CUDA only
    assert sdpa.default_strategy(cuda, "grouped", 8) == sdpa.default_strategy(cuda, "grouped", 32) == "split"
    assert sdpa.default_strategy(cuda, "grouped", 33) == sdpa.default_strategy(cpu, "grouped", 8) == "views"
    assert sdpa.default_strategy(cuda, "grouped", 8, torch.float32) == "split"
    assert sdpa.default_strategy(cuda, "grouped", 9, torch.float32) == "views"
    assert sdpa.default_strategy(cuda, "natural", 8) == "split"
    q = torch.randn(1, 2, 18, 8)
    with pytest.raises(ValueError, match="token_order must be one of"):
        vidkern.hsda(q, q, q, (2, 3, 3), token_order="group-major")
    with pytest.raises(TypeError, match="token_order must be a str"):
        vidkern.hsda(q, q, q, (2, 3, 3), token_order=1)
    with pytest.raises(ValueError, match="strategy must be one of"):
        vidkern.hsda(q, q, q, (2, 3, 3), strategy="sdpa")
    with pytest.raises(ValueError, match="strategy='views' needs token_order='grouped'"):
        vidkern.hsda(q, q, q, (2, 3, 3), strategy="views")


@pytest.mark.parametrize("threads, n", [(2, 128), (4, 256)])
def test_cpu_query_folding_is_exact(threads, n):
    """sdpa.attention splits the queries of 3 heads into row blocks on CPU so the pairs divide
    among the threads; outputs and gradients equal plain attention."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(f"sdpa.attention folded x{threads}",
                                lambda q, k, v: sdpa.attention(q, k, v, 0.3),
                                lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3),
                                [torch.randn(1, 3, n, 16) for _ in range(3)], torch.float32)
    finally:
        torch.set_num_threads(prev)


def _backends_here():
    from vidkern import dispatch
    names = ["torch", "reference"]
    if not dispatch.get("triton").reasons("hsda", torch.device("cpu"), torch.float32, forced=True):
        names.append("triton")                       # Triton's interpreter
    return names


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("strategy", sdpa.STRATEGIES)
def test_outputs_are_token_major(strategy, backend):
    """Every strategy's kernels write (B, H, N, d) laid out as (B, N, H, d): the output projection's
    transpose-reshape is a view (the reference backend, differentiated by autograd, excepted)."""
    grid = (2, 4, 4)
    q, k, v = (torch.randn(1, 4, 32, 32) for _ in range(3))
    order = "grouped" if strategy == "views" else "natural"
    out = vidkern.hsda(q, k, v, grid, 2, strategy=strategy, backend=backend, token_order=order)
    if backend == "reference" and strategy == "fused":
        pytest.skip("the reference backend's output is whatever autograd's ops return")
    assert out.transpose(1, 2).is_contiguous(), out.stride()


def test_forced_backend_by_environment_runs_every_head(monkeypatch):
    """$VIDKERN_BACKEND forces a backend like backend= does: strategy "fused", no SDPA heads."""
    grid = (2, 4, 4)
    q, k, v = (torch.randn(1, 4, 32, 8) for _ in range(3))
    want = R.hsda(q, k, v, grid, 2, "checkerboard", 8 ** -0.5)
    monkeypatch.setenv("VIDKERN_BACKEND", "reference")
    assert torch.equal(vidkern.hsda(q, k, v, grid, 2), want)
    assert torch.equal(vidkern.hsda(q, k, v, grid, 2, backend="reference"), want)
