"""No op synchronises with the host on CUDA tensors (issue 13): value checks are device-side
asserts there, and an explicit pattern's host copy is made once per tensor, not once per call."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vidkern
from vidkern import checks, patterns

GPU = torch.cuda.is_available()


class HostReads(TorchDispatchMode):
    """Records the ATen calls that read device values on the host or copy to the CPU."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "_to_copy", "bincount", "argsort", "sort", "unique_consecutive"):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16])
def test_explicit_pattern_host_copy_is_made_once(dtype):
    n = 48
    p = (torch.arange(n) % 3).to(dtype)
    with HostReads() as first:
        name, ids = checks.pattern(p, n, p.device)
        patterns.layout(ids, (1, 6, 8), p.device)
        assert patterns.num_groups(ids, (1, 6, 8)) == 3
    assert ids is p and name == "explicit"           # the caller's tensor: per-tensor caches hit
    assert first.calls                                # the first call did copy and read the ids
    with HostReads() as again:
        checks.pattern(p, n, p.device)
        patterns.layout(p, (1, 6, 8), p.device)
        patterns.num_groups(p, (1, 6, 8))
    assert again.calls == []
    p[0] = 2                                          # modified in place: a new version, a new copy
    with HostReads() as modified:
        assert patterns.host_ids(p).sizes.tolist() == [15, 16, 17]
    assert modified.calls


def test_modified_pattern_is_rechecked():
    p = torch.zeros(12, dtype=torch.int32)
    checks.pattern(p, 12, p.device)
    p[3] = -1
    with pytest.raises(ValueError, match="non-negative group ids, got min -1"):
        checks.pattern(p, 12, p.device)


def test_group_mean_reads_the_cached_ids():
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    p = (torch.arange(12) // 6).to(torch.int32)
    ref = vidkern.group_mean(x, (1, 3, 4), p)
    with HostReads() as again:
        out = vidkern.group_mean(x, (1, 3, 4), p)
    assert "bincount" not in again.calls and "_local_scalar_dense" not in again.calls   # (_to_copy: dtype casts)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 0], x[:, :6].mean(1))
    missing = torch.tensor([0] * 6 + [2] * 6, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        vidkern.group_mean(x, (1, 3, 4), missing)


def test_sync_checks_flag(monkeypatch):
    monkeypatch.delenv("VIDKERN_SYNC_CHECKS", raising=False)
    assert not checks.sync_checks()
    monkeypatch.setenv("VIDKERN_SYNC_CHECKS", "1")
    assert checks.sync_checks()


@pytest.mark.skipif(not GPU, reason="needs a CUDA device (torch.cuda.set_sync_debug_mode)")
def test_no_op_synchronises_on_cuda():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(2, 64, 32, device=dev)
    e = torch.randn(2, 64, 32, device=dev)
    scores = torch.rand(2, 64, device=dev)
    start = torch.zeros(2, dtype=torch.long, device=dev)
    q, k, v = (torch.randn(2, 4, 2 * 16, 32, device=dev, dtype=torch.float16) for _ in range(3))
    p = (torch.arange(32, device=dev) % 2).to(torch.int32)
    h = torch.randn(2, 32, device=dev)

    def run():
        idx = vidkern.select_meta_tokens(x, 16, scores, start=start)
        vidkern.orthogonal_select(x, 8, start)
        u = torch.nn.functional.normalize(x, dim=-1)
        vidkern.soft_merge(u, idx, x, e)
        vidkern.hsda(q, k, v, (2, 4, 4), pattern=p)
        vidkern.group_mean(x[:, :32], (2, 4, 4), p)
        vidkern.team_gate(x, h)
        vidkern.feature_summary(x)

    run()   # warm: kernels compiled, the pattern's host copy made once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
