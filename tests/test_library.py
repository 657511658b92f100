"""One declaration per op (vidkern.library): a toy op declared the way docs/adding-an-op.md says
gets its custom ops, fake, autograd, double-backward guard and FLOP formula from the one helper,
and a backend implementing its derived interface runs it."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vidkern  # noqa: F401  (registers the backends)
from vidkern import dispatch, library
from vidkern.dispatch import Backend


def _toy_fake(x, alpha, backend):
    return torch.empty_like(x), x.new_empty(x.shape[:-1])


TOY = library.OpSpec(
    "toy_scale", "(Tensor x, float alpha, str backend) -> (Tensor, Tensor)",
    outputs=("y", "norm"), fake=_toy_fake,
    grad_inputs=("x",), grad_outputs=("y",), saved=("x", "norm"), context=("alpha",),
    flops=lambda x, alpha, backend: 2 * x.numel(),
)


class ToyBackend(Backend):
    """y = alpha * x / |x| per row; the backward from the saved norm."""
    name = "toy"
    ops = frozenset()            # toy_scale is not in dispatch.OPS: the test calls the op directly
    devices = frozenset({"cpu"})
    dtypes = {"cpu": frozenset({torch.float32, torch.float64})}

    def toy_scale_forward(self, x, alpha):
        norm = x.norm(dim=-1)
        return alpha * x / norm[..., None], norm

    def toy_scale_backward(self, grad_y, x, norm, alpha):
        xh = x / norm[..., None]
        return alpha * (grad_y - (grad_y * xh).sum(-1, keepdim=True) * xh) / norm[..., None]


@pytest.fixture(scope="module")
def toy():
    return library.define(TOY)


@pytest.fixture
def toy_backend(monkeypatch):
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    monkeypatch.setattr(dispatch, "_PRIORITY", list(dispatch._PRIORITY))
    dispatch.register(ToyBackend(), priority=99)
    return "toy"


def test_the_declaration_derives_the_backward_schema_and_the_interface():
    assert TOY.backward_schema == "(Tensor grad_y, Tensor x, Tensor norm, float alpha, str backend) -> Tensor"
    assert library.interface(TOY) == {"toy_scale_forward": ["x", "alpha"],
                                      "toy_scale_backward": ["grad_y", "x", "norm", "alpha"]}
    hsda = library.SPECS["hsda"]
    assert hsda.backward_schema.startswith("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                                           "int[] grid, str pattern, Tensor? group_ids,")
    assert set(library.SPECS) | set(dispatch.PLAIN_INTERFACES) == set(dispatch.OPS)


def test_a_toy_op_runs_forward_backward_and_compiles(toy, toy_backend):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y, norm = toy.op(x, 2.0, toy_backend)
    torch.testing.assert_close(y, 2.0 * x / x.norm(dim=-1, keepdim=True))
    assert torch.autograd.gradcheck(lambda t: toy.op(t, 2.0, toy_backend)[0], (x,))
    # no gradient for the declared differentiable output (only the statistic is used): a zero gradient
    (g,) = torch.autograd.grad(norm.sum(), x, allow_unused=True)
    assert g is None or torch.count_nonzero(g) == 0
    torch.library.opcheck(toy.op, (x.detach().float().requires_grad_(), 0.5, toy_backend))
    compiled = torch.compile(lambda t: toy.op(t, 3.0, toy_backend)[0].sum(), fullgraph=True)
    torch.testing.assert_close(compiled(x.detach()), toy.op(x.detach(), 3.0, toy_backend)[0].sum())
    with FlopCounterMode(display=False) as counter:
        toy.op(x.detach(), 1.0, toy_backend)
    assert counter.get_total_flops() == 2 * x.numel()


def test_the_toy_op_refuses_double_backward(toy, toy_backend):
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(toy.op(x, 1.0, toy_backend)[0].sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="vidkern.toy_scale: second-order gradients"):
        g.sum().backward()


def test_a_backend_with_the_wrong_signature_is_refused():
    class Wrong(ToyBackend):
        name = "wrong"
        ops = frozenset({"team_gate"})

        def team_gate_forward(self, x, gate):     # the declaration names it h
            return x, x

        def team_gate_backward(self, grad_y, x, h, s):
            return x, h

    assert dispatch.interface_errors(Wrong()) == ["team_gate: team_gate_forward(x, gate) must take (x, h)"]
