"""The Triton HSDA kernels against the float64 reference and FlexAttention.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on
small shapes that still cover every code path: several key tiles, ragged last tiles, both
checkerboard groups of odd grids, T = 1, all-global and all-sparse head splits.
"""
import pytest
import torch

import vidkern
from vidkern import dispatch, patterns, reference as R
from tolerance import assert_close, check_against_reference

reasons = dispatch.get("triton").reasons(
    "hsda", torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32, forced=True)
pytestmark = pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from vidkern.kernels import hsda as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = K.tile_config(16, 16)   # many tiles per group, ragged ends


def _qkv(b, h, n, d, dtype=torch.float32):
    return [torch.randn(b, h, n, d).to(DEVICE, dtype) for _ in range(3)]


def _triton(grid, hg, pattern="checkerboard", scale=None):
    return lambda q, k, v: vidkern.hsda(q, k, v, grid, hg, pattern, scale, backend="triton")


@pytest.mark.parametrize("grid", [(3, 5, 7), (1, 7, 7)])
@pytest.mark.parametrize("hg", [0, 2, 4])
def test_public_op_matches_reference(grid, hg, poison):
    n = grid[0] * grid[1] * grid[2]
    check_against_reference(f"triton hsda {grid} Hg={hg}", _triton(grid, hg), lambda q, k, v: R.hsda(q, k, v, grid, hg),
                            _qkv(2, 4, n, 32), torch.float32)


@pytest.mark.parametrize("config", [TINY, K.tile_config(32, 16)], ids=["16x16", "32x16"])
@pytest.mark.parametrize("pattern", ["checkerboard", "temporal", "explicit", "global"])
@pytest.mark.parametrize("grid", [(3, 5, 7), (1, 1, 3), (2, 4, 4)])
def test_launcher_many_tiles(pattern, grid, config, poison):
    """Small tiles: every group spans several tiles with a ragged last one; query and key tiles
    of different sizes (the backward's dK/dV tiles are BLOCK_N rows, dQ tiles BLOCK_M)."""
    n = grid[0] * grid[1] * grid[2]
    pat = torch.randint(0, 5, (n,)).to(DEVICE) if pattern == "explicit" else pattern
    q, k, v = _qkv(1, 3, n, 32)
    out, lse = K.hsda_forward(q, k, v, grid, pat, 1, 0.3, config=config)
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    truth = R.hsda(*wide, grid, 1, pat, 0.3)
    low = R.hsda(q, k, v, grid, 1, pat, 0.3)
    assert_close("out", out, truth, low)
    g = torch.randn_like(out)
    grads = K.hsda_backward(g, q, k, v, out, lse, grid, pat, 1, 0.3, config=config)
    want = torch.autograd.grad(truth, wide, g.double())
    lw = [t.clone().requires_grad_() for t in (q, k, v)]
    low_g = torch.autograd.grad(R.hsda(*lw, grid, 1, pat, 0.3), lw, g)
    for name, got, w, lg in zip("qkv", grads, want, low_g):
        assert_close(f"d{name}", got, w, lg)


def test_against_flex_attention():
    """An independent implementation: FlexAttention with a mask_mod for the same groups."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    grid, hg, heads = (2, 14, 14), 2, 4
    n = 392
    ids = patterns.group_ids("checkerboard", grid, DEVICE)

    def mask_mod(b, h, q_idx, kv_idx):
        return (h < hg) | (ids[q_idx] == ids[kv_idx])
    q, k, v = _qkv(1, heads, n, 32)
    mask = create_block_mask(mask_mod, None, heads, n, n, device=DEVICE)
    want = flex_attention(q, k, v, block_mask=mask)
    got = vidkern.hsda(q, k, v, grid, hg, backend="triton")
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_strided_qkv_and_stride0_grad():
    b, n, heads, d, grid = 2, 35, 4, 32, (1, 5, 7)
    base = torch.randn(b, n, 3, heads, d).to(DEVICE).requires_grad_()
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = vidkern.hsda(q, k, v, grid, backend="triton")
    out.sum().backward()                               # an expanded, stride-0 output gradient
    ref_base = base.detach().double().requires_grad_()
    ref = R.hsda(*ref_base.permute(2, 0, 3, 1, 4).unbind(0), grid)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(base.grad.double(), ref_base.grad, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("d", [64, 128])
def test_default_half_configs(d, poison):
    """The launch configs a GPU run would pick for float16 (FlashAttention-sized tiles)."""
    grid = (2, 7, 7)
    check_against_reference(f"triton hsda fp16 d={d}", _triton(grid, 2), lambda q, k, v: R.hsda(q, k, v, grid, 2),
                            _qkv(1, 4, 98, d), torch.float16)


def test_explicit_pattern_tables_are_cached_per_tensor():
    ids = torch.tensor([0, 1, 2] * 5).to(DEVICE)
    first = K.tables(ids, (1, 3, 5), 16, DEVICE)
    assert K.tables(ids, (1, 3, 5), 16, DEVICE) is first
    ids[0] = 2                                       # an in-place change bumps the version: rebuilt
    rebuilt = K.tables(ids, (1, 3, 5), 16, DEVICE)
    assert rebuilt is not first and rebuilt.goff.tolist() == [0, 4, 9, 15]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, poison):
    why = dispatch.get("triton").reasons("hsda", torch.device(DEVICE), dtype, forced=True)
    if why:   # bfloat16 on CPU: the interpreter's bf16 tl.dot is wrong (tests/test_triton_backend.py)
        pytest.skip("; ".join(why))
    grid = (2, 3, 5)
    check_against_reference(f"triton hsda {dtype}", _triton(grid, 2), lambda q, k, v: R.hsda(q, k, v, grid, 2),
                            _qkv(1, 4, 30, 32), dtype)


@pytest.mark.parametrize("d", [8, 48, 59, 256])
def test_other_head_dims_fall_back_with_a_reason(d):
    q, k, v = _qkv(1, 2, 15, d)
    with pytest.raises(NotImplementedError, match=f"head dim {d}"):
        vidkern.hsda(q, k, v, (1, 3, 5), backend="triton")
    chosen = dispatch.select(dispatch.Inputs("hsda", torch.device(DEVICE), torch.float16, head_dim=d))
    assert chosen.name == "torch"          # automatic dispatch falls back


@pytest.mark.parametrize("grid", [(3, 5, 7), (2, 4, 4), (1, 1, 1), (2, 14, 14)])
def test_work_check(grid):
    """Sparse-dense programs visit only key tiles of their own group — about half the tiles of a
    global program — and never a key of the other group."""
    n = grid[0] * grid[1] * grid[2]
    heads, hg = 4, 2
    q, k, v = _qkv(1, heads, n, 32)
    _, _, count = K.hsda_forward(q, k, v, grid, "checkerboard", hg, 0.25, config=TINY, debug=True)
    visits, wrong, is_global = count[0].cpu().unbind(-1)
    assert int(wrong.sum()) == 0
    tiles = -(-n // 16)
    g_visits = visits[is_global == 1]
    s_visits = visits[is_global == 0]
    assert (g_visits == tiles).all() and g_visits.numel() == hg * tiles
    sizes = [grid[0] * ((grid[1] * grid[2] + 1) // 2), grid[0] * (grid[1] * grid[2] // 2)]
    want = [-(-size // 16) for size in sizes for _ in range(-(-size // 16))]
    assert s_visits.tolist() == want * (heads - hg)
    if n >= 256:  # a head's sparse-dense work is about half of a global head's (tiles round up)
        ratio = s_visits.sum().item() / g_visits.sum().item()
        assert 0.45 <= ratio <= 0.65, ratio


@triton.jit
def _shifted_rows(j, g, is_global, PERM, GOFF):
    """A broken row map for the test below: the group's j-th token moved on by one in natural order."""
    return tl.where(is_global, j, (tl.load(PERM + tl.load(GOFF + g) + j) + 1) % tl.load(GOFF + 2))


@pytest.mark.skipif(DEVICE != "cpu", reason="swaps a jit helper, which only the interpreter picks up at run time")
def test_work_counter_catches_wrong_group_keys(monkeypatch):
    """The wrong-group counter can fail: break the row tables (every row shifted by one)."""
    monkeypatch.setattr(K, "_group_rows", _shifted_rows)
    q, k, v = _qkv(1, 2, 30, 32)
    _, _, count = K.hsda_forward(q, k, v, (2, 3, 5), "checkerboard", 0, 0.25, config=TINY, debug=True)
    assert int(count[..., 1].sum()) > 0


def test_compiles_as_one_custom_op():
    seen = []

    def capture(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    torch._dynamo.reset()
    q, k, v = [t.requires_grad_() for t in _qkv(1, 2, 12, 32)]
    fn = torch.compile(lambda a, b, c: vidkern.hsda(a, b, c, (1, 3, 4), backend="triton"), fullgraph=True,
                       backend=capture)
    out = fn(q, k, v)
    out.sum().backward()
    assert seen.count("vidkern.hsda.default") == 1
    torch.testing.assert_close(out, R.hsda(q, k, v, (1, 3, 4)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- packed small groups
def _explicit_small(n):
    """Groups of 1 to 8 tokens in shuffled positions: several equal-size buckets."""
    g = torch.Generator().manual_seed(3)
    sizes = [8, 8, 5, 5, 5, 3, 1][: n]
    ids = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    return ids[torch.randperm(ids.numel(), generator=g)]


PACKED_CASES = [  # (grid, pattern, hg, heads): every case packs for float32 (groups <= 8)
    ((8, 2, 3), "temporal", 1, 3),        # T = 8: 2 groups per 16-row tile, 3 tiles (one half full)
    ((5, 1, 3), "temporal", 0, 2),        # 3 groups of 5 in one tile
    ((1, 3, 5), "checkerboard", 2, 4),    # two buckets (8 and 7 tokens)
    ((1, 5, 7), "explicit", 1, 3),        # buckets of 8, 5, 3 and 1 token
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grid, pattern, hg, heads", PACKED_CASES, ids=["temporal8", "temporal5", "odd-grid",
                                                                        "explicit"])
def test_packed_small_groups_match_reference(grid, pattern, hg, heads, dtype, poison):
    n = grid[0] * grid[1] * grid[2]
    pat = _explicit_small(n) if pattern == "explicit" else pattern
    packs = K.packs(pat, grid, heads, hg, dtype, torch.device(DEVICE))
    assert packs, "the case must take the packed path"
    check_against_reference(f"triton hsda packed {pattern} {grid} Hg={hg}", _triton(grid, hg, pat),
                            lambda q, k, v: R.hsda(q, k, v, grid, hg, pat), _qkv(2, heads, n, 32), dtype)


def test_packed_strided_qkv_and_stride0_grad():
    """Views of a fused qkv projection and an expanded output gradient, through the packed path."""
    b, heads, d, grid = 2, 4, 32, (8, 2, 2)
    n = 32
    assert K.packs("temporal", grid, heads, 2, torch.float32, torch.device(DEVICE))
    base = torch.randn(b, n, 3, heads, d).to(DEVICE).requires_grad_()
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
    out = vidkern.hsda(q, k, v, grid, 2, "temporal", backend="triton")
    out.sum().backward()
    ref_base = base.detach().double().requires_grad_()
    ref = R.hsda(*ref_base.permute(2, 0, 3, 1, 4).unbind(0), grid, 2, "temporal")
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(base.grad.double(), ref_base.grad, rtol=1e-5, atol=2e-5)


def test_packing_rule():
    """Packed only when every sparse group is small for the dtype; a tile config or the debug
    counters ask for the tile kernel itself."""
    dev = torch.device(DEVICE)
    assert [(p.size, p.count, p.block, p.per_tile, p.tiles) for p in
            K.packs("temporal", (8, 14, 14), 12, 6, torch.bfloat16, dev)] == [(8, 196, 16, 2, 98)]
    assert K.packs("temporal", (16, 2, 2), 2, 1, torch.float16, dev)[0].block == 32
    assert K.packs("temporal", (16, 2, 2), 2, 1, torch.float32, dev) is None     # fp32: groups <= 8
    assert K.packs("temporal", (33, 1, 2), 2, 1, torch.float16, dev) is None     # 33 > 32
    assert K.packs("checkerboard", (8, 14, 14), 12, 6, torch.float16, dev) is None
    assert K.packs("temporal", (8, 2, 2), 2, 2, torch.float16, dev) is None      # no sparse heads
    q, k, v = _qkv(1, 2, 32, 32)
    _, _, count = K.hsda_forward(q, k, v, (8, 2, 2), "temporal", 1, 0.2, debug=True)
    block = K.pick_config("fwd", 32, torch.float32, 80).BLOCK_M
    assert count.shape[1] == triton.cdiv(32, block) + 4    # the tile kernel: global tiles + one per group
