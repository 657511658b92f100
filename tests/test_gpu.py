"""CUDA runs of the torch backend against the float64 CPU reference (skipped without a GPU)."""
import pytest
import torch

import vidkern
from vidkern import reference as R
from tolerance import check_against_reference
from vidkern.verify import assert_greedy_picks

pytestmark = pytest.mark.gpu


def _on_cuda(fn):
    """``fn`` run on CUDA copies of its inputs (differentiable moves), results back on the CPU."""
    def run(*args):
        outs = fn(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
        return tuple(o.cpu() for o in (outs if isinstance(outs, tuple) else (outs,)))
    return run


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grid", [(3, 5, 7), (8, 14, 14)])
def test_hsda_cuda(dtype, grid):
    n = grid[0] * grid[1] * grid[2]
    check_against_reference(
        f"hsda cuda {grid}", _on_cuda(lambda q, k, v: vidkern.hsda(q, k, v, grid, 3, backend="torch")),
        lambda q, k, v: R.hsda(q, k, v, grid, 3), [torch.randn(2, 6, n, 64) for _ in range(3)], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_team_and_merge_cuda(dtype):
    x, h = torch.randn(4, 1568, 384), torch.randn(4, 384)
    check_against_reference("team_gate cuda", _on_cuda(lambda a, b: vidkern.team_gate(a, b, backend="torch")),
                            R.team_gate, [x, h], dtype)
    check_against_reference("feature_summary cuda", _on_cuda(lambda a: vidkern.feature_summary(a, backend="torch")),
                            R.feature_summary, [x], dtype)
    xs = torch.randn(2, 784, 64)
    start = R.default_start(xs)
    picks = vidkern.orthogonal_select(xs.cuda(), 392, start.cuda(), backend="torch").cpu()
    assert_greedy_picks(picks, xs, start)     # GPU float32 may break a near tie the other way
    idx = torch.sort(picks, dim=1).values
    check_against_reference(
        "soft_merge cuda", _on_cuda(lambda a, b, c: vidkern.soft_merge(a, idx.cuda(), b, c, backend="torch")),
        lambda a, b, c: R.soft_merge(a, idx, b, c), [R.normalize(torch.randn(2, 784, 64)), xs, torch.randn(1, 784, 64)],
        dtype)
