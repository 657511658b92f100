"""torch.compile(fullgraph=True) of a small ViT using every module, on CPU."""
import torch

from tiny import TinyVideoViT, clip_for


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_custom_ops_stay_opaque_in_the_graph():
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
