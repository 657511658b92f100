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
