"""Explicit pattern tensors: memory sized by the tokens, caches that never go stale, and the
group rules checked when compiled (issue 21)."""
import pytest
import torch

import vidkern
from vidkern import patterns
from vidkern.nn import GroupAveragedClassifier

GRID = (2, 4, 4)


def _qkv(b=1, h=2, d=32):
    return [torch.randn(b, h, 32, d, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("huge", [10**9, 2**62])
def test_huge_group_ids_cost_what_the_tokens_cost(backend, huge):
    """Ids are labels: {0, 10**9} is two groups. It used to allocate by the largest id (bincount:
    10**8 took 6 GB, 10**9 was killed by the OOM killer)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = (t.to(dtype) for t in _qkv())
    small = torch.where(torch.arange(32) < 16, 0, 1)
    big = torch.where(torch.arange(32) < 16, 0, huge)
    want = vidkern.hsda(q, k, v, GRID, 1, small, backend=backend)
    torch.testing.assert_close(vidkern.hsda(q, k, v, GRID, 1, big, backend=backend), want)
    grouped = vidkern.hsda(q, k, v, GRID, 1, big, token_order="grouped")
    torch.testing.assert_close(grouped, vidkern.hsda(q, k, v, GRID, 1, small, token_order="grouped"))
    assert patterns.group_sizes(big, GRID) == (16, 16)


def test_group_mean_and_classifier_refuse_missing_ids_without_allocating_them():
    x = torch.randn(2, 32, 8)
    big = torch.where(torch.arange(32) < 16, 0, 10**9)
    with pytest.raises(ValueError, match=r"every group id in \[0, 1000000001\); missing \[1, 2, 3, 4, 5, 6, 7, 8\] "
                                         r"and 999999991 more"):
        vidkern.group_mean(x, GRID, big)
    with pytest.raises(ValueError, match=r"every group id in \[0, 1000000001\)"):
        GroupAveragedClassifier(8, 3, GRID, pattern=big)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("how", ["assign .data", "write through .data", "in place"])
def test_a_changed_pattern_is_never_served_from_the_cache(backend, how):
    """``p.data = other`` keeps the version counter, and a write through ``p.data`` bypasses it:
    the cached host copy, layout, grouped order and kernel tables must follow the values anyway."""
    q, k, v = (t.float() for t in _qkv())
    p = torch.arange(32) % 2
    for order in ("natural", "grouped"):
        vidkern.hsda(q, k, v, GRID, 0, p, backend=backend, token_order=order)   # fills every cache
    new = torch.arange(32) % 3
    if how == "assign .data":
        p.data = new.clone()
    elif how == "write through .data":
        p.data.copy_(new)
    else:
        p.copy_(new)
    assert patterns.group_sizes(p, GRID) == (11, 11, 10)
    for order in ("natural", "grouped"):
        got = vidkern.hsda(q, k, v, GRID, 0, p, backend=backend, token_order=order)
        torch.testing.assert_close(got, vidkern.hsda(q, k, v, GRID, 0, new.clone(), backend=backend,
                                                     token_order=order))


def test_forget_drops_the_cached_copy():
    p = torch.arange(32) % 2
    patterns.host_ids(p)
    assert patterns.known_host_ids(p) is not None
    patterns.forget(p)
    assert patterns.known_host_ids(p) is None


@pytest.mark.parametrize("ids", [(torch.arange(32) % 2) * 5, torch.zeros(32, dtype=torch.long),
                                 torch.full((32,), 10**6), torch.full((32,), -3)],
                         ids=["gap", "all-zero", "huge", "negative"])
def test_compiled_group_mean_raises_where_eager_does(ids):
    """Compiled group_mean returned NaN (an empty group's mean) or read out of range silently."""
    torch._dynamo.reset()
    x = torch.randn(2, 32, 8)
    with pytest.raises(ValueError):
        vidkern.group_mean(x, GRID, ids, num_groups=2)
    compiled = torch.compile(lambda x, ids: vidkern.group_mean(x, GRID, ids, 2), fullgraph=True)
    good = torch.arange(32) % 2
    torch.testing.assert_close(compiled(x, good), vidkern.group_mean(x, GRID, good, 2))
    with pytest.raises(RuntimeError, match="pattern tensor must"):
        compiled(x, ids)


def test_compiled_group_mean_needs_num_groups_for_a_tensor():
    torch._dynamo.reset()
    x = torch.randn(2, 32, 8)
    with pytest.raises(ValueError, match="num_groups is required"):
        torch.compile(lambda x, ids: vidkern.group_mean(x, GRID, ids))(x, torch.arange(32) % 2)


def test_compiled_hsda_refuses_negative_ids():
    torch._dynamo.reset()
    q = torch.randn(1, 2, 32, 8)
    compiled = torch.compile(lambda q, ids: vidkern.hsda(q, q, q, GRID, pattern=ids), fullgraph=True)
    good = torch.arange(32) % 3
    torch.testing.assert_close(compiled(q, good), vidkern.hsda(q, q, q, GRID, pattern=good))
    with pytest.raises(ValueError, match="non-negative group ids"):
        vidkern.hsda(q, q, q, GRID, pattern=good - 1)
    with pytest.raises(RuntimeError, match="non-negative group ids"):
        compiled(q, good - 1)


def test_the_cache_key_sees_every_change_torch_exposes_without_a_sync():
    """A CUDA pattern's values cannot be compared without a host sync, so the key itself must change
    with everything torch records: an in-place op (the version counter), ``p.data = other`` (which
    keeps the version: the storage), a view of other elements, a dtype change."""
    p = torch.arange(32) % 2
    seen = {patterns._fingerprint(p)}
    p.data = torch.arange(32) % 3
    seen.add(patterns._fingerprint(p))
    p.add_(1)
    seen.add(patterns._fingerprint(p))
    p.data = p.data[:]                                 # the same storage and elements: may stay
    p.data = torch.arange(64)[::2].clone()[:32]
    seen.add(patterns._fingerprint(p))
    p.data = p.data.int()
    seen.add(patterns._fingerprint(p))
    assert len(seen) == 5
