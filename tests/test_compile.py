"""torch.compile(fullgraph=True) of a small ViT using every module, on CPU."""
import pytest
import torch

import vidkern
from vidkern import models

from tiny import TinyVideoViT, clip_for


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_custom_ops_stay_opaque_in_the_graph(monkeypatch):
    # the torch backend for every op (on CPU dispatch gives TEAM and small merges to the reference,
    # traced as plain PyTorch: vidkern.dispatch.RULES)
    monkeypatch.setenv("VIDKERN_BACKEND", "torch")
    seen = set()

    def capture(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    model = TinyVideoViT().train()
    torch.compile(model, fullgraph=True, backend=capture)(clip_for(model)).sum().backward()
    for op in ("vidkern.hsda.default", "vidkern.feature_summary.default", "vidkern.team_gate.default",
               "vidkern.orthogonal_select.default", "vidkern.soft_merge.default"):
        assert op in seen, f"{op} missing from the traced graph: {sorted(s for s in seen if 'vidkern' in s)}"


def test_inductor_fullgraph_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    model = TinyVideoViT().eval()
    clips = clip_for(model)
    eager = model(clips)
    eager.square().sum().backward()
    want = _grads(model)
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(clips)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_dynamic_shapes_and_noncontiguous_inputs_compile():
    """Batch sizes change under dynamic=True; a channels-first TEAM input keeps the fake strides honest."""
    from vidkern.nn import TEAM, HSDAttention
    torch._dynamo.reset()
    attn = HSDAttention(16, 2, grid=(1, 3, 6))
    compiled = torch.compile(attn, fullgraph=True, dynamic=True)
    for b in (2, 3):
        x = torch.randn(b, 18, 16)
        torch.testing.assert_close(compiled(x), attn(x), rtol=1e-4, atol=1e-5)
    team = TEAM(16, (0.25, 0.5, 0.75))
    x = torch.randn(2, 16, 10).transpose(1, 2).requires_grad_()   # (B, N, D) with channels-first storage
    compiled = torch.compile(team, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    want = team(x.detach())
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_explicit_pattern_classifier_compiles():
    from vidkern.nn import GroupAveragedClassifier
    torch._dynamo.reset()
    head = GroupAveragedClassifier(8, 3, grid=(1, 3, 4), pattern=torch.tensor([0, 1, 2] * 4))
    x = torch.randn(2, 12, 8)
    torch.testing.assert_close(torch.compile(head, fullgraph=True)(x), head(x))


def raises_while_tracing(exc, match):
    """A check that fails on what tracing knows (a shape, a dtype, a constant): under
    ``fullgraph=True`` torch wraps every exception raised while tracing into its ``Unsupported``
    ("Observed exception"), which then carries vidkern's message (README "Under torch.compile")."""
    return pytest.raises((exc, torch._dynamo.exc.Unsupported), match=match)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_checks_while_tracing_raise_the_documented_error(fullgraph):
    """With torch.compile's default (graph breaks allowed) the ValueError/TypeError itself reaches
    the caller; with fullgraph=True torch's Unsupported carries the same message."""
    torch._dynamo.reset()
    u = torch.nn.functional.normalize(torch.randn(2, 20, 8), dim=-1)
    x = torch.randn(2, 20, 8)
    q = torch.randn(1, 2, 24, 16)
    cases = [
        (ValueError, "tau must be a finite positive float",
         lambda: vidkern.soft_merge(u, torch.tensor([[0, 3], [4, 5]]), x, x, -1.0)),
        (TypeError, "idx must be int64", lambda: vidkern.soft_merge(u, torch.tensor([[0, 3], [4, 5]], dtype=torch.int32),
                                                                    x, x)),
        (ValueError, r"pattern tensor must have shape \(N,\) = \(24,\)",
         lambda: vidkern.hsda(q, q, q, (2, 3, 4), pattern=torch.zeros(23, dtype=torch.long))),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()                                              # eager
        compiled = torch.compile(call, fullgraph=fullgraph)
        with (raises_while_tracing(exc, match) if fullgraph else pytest.raises(exc, match=match)):
            compiled()


def _bad_index_calls(backend):
    """Compiled soft_merge / orthogonal_select with out-of-range indices, and bad tau values."""
    import math

    import pytest

    import vidkern
    torch._dynamo.reset()
    length = 20
    u = torch.nn.functional.normalize(torch.randn(2, length, 8), dim=-1)
    x = torch.randn(2, length, 8)
    merge = torch.compile(lambda idx, tau: vidkern.soft_merge(u, idx, x, x, tau, backend=backend), fullgraph=True)
    select = torch.compile(lambda start: vidkern.orthogonal_select(x, 4, start, backend=backend), fullgraph=True)
    good = torch.tensor([[0, 3, 7], [4, 5, 19]])
    want = vidkern.soft_merge(u, good, x, x, backend=backend)
    torch.testing.assert_close(merge(good, 1.0), want)
    for bad in (20, 21, -1, 10 ** 6):
        idx = good.clone()
        idx[1, 1] = bad
        with pytest.raises(ValueError, match=r"idx must hold token indices in \[0, 20\)"):
            merge(idx, 1.0)
    for tau in (-1.0, math.nan, 0.0, math.inf):
        with pytest.raises(Exception, match="tau must be a finite positive float"):
            merge(good, tau)
    torch.testing.assert_close(select(torch.tensor([0, 1])), vidkern.orthogonal_select(x, 4, torch.tensor([0, 1]),
                                                                                      backend=backend))
    for bad in (-1, 20, 10 ** 6):
        with pytest.raises(ValueError, match=r"start must hold indices in \[0, 20\)"):
            select(torch.tensor([bad, 1]))


def test_compiled_calls_check_indices_and_tau_at_run_time():
    """SPEC §5: value checks that cannot run while tracing run when the compiled graph runs, so a
    bad index never reaches a kernel (it used to read out of bounds: garbage, or a segfault)."""
    _bad_index_calls("torch")


def test_compiled_cuda_kernels_never_see_bad_indices(cuda_kernel_device):
    """The CUDA kernels (emulated on CPU) segfaulted on idx = 10**6 and start = 10**6 when compiled."""
    if cuda_kernel_device.type != "cpu":
        import pytest
        pytest.skip("emulator case; on a GPU the check is a device-side assert")
    _bad_index_calls("cuda")


def test_compiled_reference_asserts_on_bad_indices():
    import pytest

    import vidkern
    torch._dynamo.reset()
    u = torch.nn.functional.normalize(torch.randn(2, 20, 8), dim=-1)
    x = torch.randn(2, 20, 8)
    merge = torch.compile(lambda idx: vidkern.soft_merge(u, idx, x, x, backend="reference"), fullgraph=True)
    merge(torch.tensor([[0, 3], [4, 5]]))
    with pytest.raises(RuntimeError, match=r"idx must hold token indices in \[0, 20\)"):
        merge(torch.tensor([[0, 3], [4, -1]]))


def test_a_broken_extension_does_not_break_compilation(monkeypatch):
    """Dispatch asks whether vidkern._C loads; torch.compile must take that answer as a constant
    (tracing the failing import broke the graph: "Unsupported: Import failure")."""
    import importlib.util
    import sys

    import vidkern
    from vidkern.backends import cuda
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "vidkern._C" else find(n, *a))
    monkeypatch.setitem(sys.modules, "vidkern._C", None)
    monkeypatch.delattr(vidkern, "_C", raising=False)
    cuda.extension_error.cache_clear()
    try:
        torch._dynamo.reset()
        x = torch.randn(2, 5, 8)
        out = torch.compile(lambda t: vidkern.feature_summary(t), fullgraph=True)(x)
        torch.testing.assert_close(out, vidkern.feature_summary(x))
        assert "is built but does not load" in cuda.extension_error()
    finally:
        monkeypatch.undo()
        cuda.extension_error.cache_clear()


#: the smallest overrides that keep each preset's features (TEAM blocks, both STTM merges)
SMALL = dict(embed_dim=64, depth=2, num_heads=2, num_frames=4, img_size=64, num_classes=5)
_TEAM = dict(team_blocks=(0, 1), team_ratios={"early": (0.25, 0.5, 0.75), "late": (0.25, 0.5, 0.75)})
SMALL_EXTRA = {"team_s": _TEAM, "team_b": _TEAM,
               "sttm_vit_s": dict(depth=3, sttm_blocks=(1, 2)), "sttm_vit_b": dict(depth=3, sttm_blocks=(1, 2))}


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_every_preset_compiles_fullgraph_exports_and_matches_eager(name):
    """The README promises fullgraph models: every preset (the FAR ones in grouped token order
    included) compiles with ``fullgraph=True`` — also after an eager warm-up, which fills vidkern's
    caches — and exports, and both match eager, forward and backward."""
    torch._dynamo.reset()
    model = models.create(name, **{**SMALL, **SMALL_EXTRA.get(name, {})}).eval()
    clips = torch.randn(2, 3, 4, 64, 64)
    eager = model(clips)
    eager.square().sum().backward()
    want = _grads(model)
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(clips)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    for key, g in _grads(model).items():
        torch.testing.assert_close(g, want[key], rtol=1e-3, atol=1e-4, msg=lambda m: f"{key}: {m}")
    with torch.no_grad():
        exported = torch.export.export(model, (clips,))
        torch.testing.assert_close(exported.module()(clips), eager.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["fused", "split", "views", None])
@pytest.mark.parametrize("pattern", ["checkerboard", "temporal", "explicit"])
def test_grouped_hsda_compiles_fullgraph(strategy, pattern):
    """``hsda(token_order="grouped")`` under fullgraph, every strategy and pattern kind. An explicit
    pattern's group sizes are its values, which tracing cannot read: the default is then "split",
    and "views" (which needs them) is refused by name."""
    torch._dynamo.reset()
    grid = (2, 3, 4)
    q, k, v = (torch.randn(2, 4, 24, 16, requires_grad=True) for _ in range(3))
    ids = torch.arange(24) % 5 if pattern == "explicit" else pattern
    call = lambda q, k, v, ids: vidkern.hsda(q, k, v, grid, 2, ids, token_order="grouped", strategy=strategy)  # noqa: E731
    eager = call(q, k, v, ids)
    compiled = torch.compile(call, fullgraph=True)
    if strategy == "views" and pattern == "explicit":
        with raises_while_tracing(ValueError, "strategy='views' needs the groups' sizes"):
            compiled(q, k, v, ids)
        return
    out = compiled(q, k, v, ids)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for g, want in zip(grads, torch.autograd.grad(eager.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
