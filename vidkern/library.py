"""One declaration per fused op, turned into its ``torch.library`` custom ops by one helper.

Each op that runs on a backend's kernels is an :class:`OpSpec` in :data:`SPECS` (declared at the
bottom of this file). :func:`define` makes from it:

- the forward custom op ``vidkern::<name>`` with ``spec.schema``. Its body optionally re-checks
  values a trace could not see (``spec.check_values``, when the call passes
  ``check_values=True``), then calls the backend's ``<name>_forward`` (``<name>`` for an op
  without a backward) with keyword arguments: the schema's, minus ``backend``/``check_values``,
  through ``spec.to_backend``;
- its fake implementation (``spec.fake``: output shapes, dtypes *and strides*);
- for a differentiable op, the backward custom op ``vidkern::<name>_backward``. Its schema is
  derived: ``grad_<output>`` for each of ``spec.grad_outputs``, the ``spec.saved`` tensors, the
  ``spec.context`` arguments, then ``backend``. It returns one gradient per ``spec.grad_inputs``.
  It calls the backend's ``<name>_backward`` and has a fake (the inputs' shapes and dtypes);
- the autograd registration. Setup saves ``spec.saved`` and keeps ``spec.context``. The backward
  returns ``None`` for every input when no differentiable output has a gradient, and otherwise
  replaces each missing gradient with zeros;
- a double backward that raises (SPEC §5) and the FLOP formulas ``spec.flops`` /
  ``spec.backward_flops`` (``torch.utils.flop_counter``: a multiply-add is 2 FLOPs).

The same declaration is the **backend interface**: :func:`interface` lists the methods and the
parameter names a backend implementing the op must have, and :func:`vidkern.dispatch.register`
checks every backend against it; :data:`vidkern.dispatch.OPS` is ``SPECS`` plus the plain ops.
Adding an op: ``docs/adding-an-op.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.library import custom_op
from torch.utils.flop_counter import flop_registry as _flop_registry
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from . import checks, patterns, reference, sdpa
from .kernels.limits import accumulation_dtype

_CALL_ONLY = ("backend", "check_values")     # schema arguments the backend methods never see


def _parse(schema: str) -> tuple:
    """``"(T a, U b) -> R"`` -> ``([(T, a), (U, b)], R)`` (types here hold no commas)."""
    args, _, returns = schema.partition("->")
    inner = args.strip()[1:-1]
    params = [tuple(a.strip().rsplit(" ", 1)) for a in inner.split(",")]
    return params, returns.strip()


@dataclass(frozen=True)
class OpSpec:
    """The declaration of one fused op (module docstring). Names refer to the schema's arguments
    and to ``outputs``."""

    name: str
    schema: str                               # torch.library schema of the forward, ending in "str backend"
    outputs: tuple                            # names of the forward's outputs, in order
    fake: Callable                            # fake(*schema args) -> outputs (shapes, dtypes, strides)
    reference: Optional[Callable] = None      # the vidkern.reference function (kwargs: to_backend's)
    returns: tuple = ()                       # the outputs the public function returns (default: the first)
    facts: Callable = lambda args: {}         # args -> the shape facts of dispatch.Inputs
    empty: Callable = lambda args: False      # args -> True: no work; the reference gives the empty results
    grad_inputs: tuple = ()                   # differentiable inputs; () for an op without a backward
    grad_outputs: tuple = ()                  # outputs whose gradients the backward takes
    saved: tuple = ()                         # inputs and outputs the backward reads (save_for_backward)
    context: tuple = ()                       # non-saved arguments the backward takes (kept on ctx)
    to_backend: Callable = dict               # schema args (a dict, in order) -> the backend's kwargs
    check_values: Optional[Callable] = None   # check_values(args, traced=False): values a trace could not check
    flops: Optional[Callable] = None          # flops(*forward args) -> FLOPs
    backward_flops: Optional[Callable] = None  # backward_flops(*backward args) -> FLOPs
    params: list = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "params", _parse(self.schema)[0])

    @property
    def differentiable(self) -> bool:
        return bool(self.grad_inputs)

    @property
    def arg_names(self) -> list:
        return [name for _, name in self.params]

    def type_of(self, name: str) -> str:
        return dict((n, t) for t, n in self.params).get(name, "Tensor")   # outputs are Tensors

    @property
    def backward_schema(self) -> str:
        names = [f"grad_{o}" for o in self.grad_outputs] + list(self.saved) + list(self.context)
        args = ", ".join(f"{'Tensor' if n.startswith('grad_') else self.type_of(n)} {n}" for n in names)
        rets = "Tensor" if len(self.grad_inputs) == 1 else "(" + ", ".join(["Tensor"] * len(self.grad_inputs)) + ")"
        return f"({args}, str backend) -> {rets}"

    def backend_kwargs(self, args: dict) -> dict:
        return self.to_backend({k: v for k, v in args.items() if k not in _CALL_ONLY})

    @property
    def public(self) -> tuple:
        return self.returns or self.outputs[:1]


def interface(spec: OpSpec) -> dict:
    """``{method name: [parameter names]}`` a backend implementing ``spec`` provides (the names are
    ``to_backend`` applied to the argument names, which is why it must only rename and merge)."""
    forward = list(spec.backend_kwargs({n: n for n in spec.arg_names}))
    if not spec.differentiable:
        return {spec.name: forward}
    grads = [f"grad_{o}" for o in spec.grad_outputs]
    backward = grads + list(spec.saved) + list(spec.backend_kwargs({n: n for n in spec.context}))
    return {f"{spec.name}_forward": forward, f"{spec.name}_backward": backward}


@dataclass
class Defined:
    """The custom ops made from one spec."""
    spec: OpSpec
    op: object
    backward_op: object = None
    #: the same forward and backward as an ``autograd.Function`` in torch.func's style, for calls
    #: under a torch.func transform (torch's custom-op autograd has no ``setup_context`` there)
    function: object = None


def _backend(name: str):
    # dispatch imports this module (its op list and interfaces come from SPECS), so not the reverse
    from .dispatch import get
    return get(name)


def define(spec: OpSpec) -> Defined:
    names = spec.arg_names
    forward_method = f"{spec.name}_forward" if spec.differentiable else spec.name

    def forward(*args):
        bound = dict(zip(names, args))
        if spec.check_values is not None and bound.get("check_values"):
            spec.check_values(bound)
        return getattr(_backend(bound["backend"]), forward_method)(**spec.backend_kwargs(bound))

    op = custom_op(f"vidkern::{spec.name}", forward, mutates_args=(), schema=spec.schema)
    op.register_fake(spec.fake)
    if spec.flops is not None:
        _flop_formula(spec.name, spec.flops)
    if not spec.differentiable:
        return Defined(spec, op)

    bnames = [n for _, n in _parse(spec.backward_schema)[0]]

    def backward_impl(*args):
        bound = dict(zip(bnames, args))
        backend = bound.pop("backend")
        kwargs = {n: bound[n] for n in bnames if n != "backend" and n not in spec.context}
        kwargs.update(spec.backend_kwargs({n: bound[n] for n in spec.context}))
        return getattr(_backend(backend), f"{spec.name}_backward")(**kwargs)

    def backward_fake(*args):
        bound = dict(zip(bnames, args))
        grads = tuple(_empty_like(bound[n]) for n in spec.grad_inputs)
        return grads[0] if len(grads) == 1 else grads

    bop = custom_op(f"vidkern::{spec.name}_backward", backward_impl, mutates_args=(), schema=spec.backward_schema)
    bop.register_fake(backward_fake)
    if spec.backward_flops is not None:
        _flop_formula(f"{spec.name}_backward", spec.backward_flops)

    def setup_context(ctx, inputs, output):
        values = dict(zip(names, inputs), **dict(zip(spec.outputs, output)))
        ctx.save_for_backward(*(values[n] for n in spec.saved))
        ctx.context = [values[n] for n in spec.context]
        ctx.backend = values["backend"]
        ctx.grad_like = [(values[o].shape, values[o].dtype, values[o].device) for o in spec.grad_outputs]

    def backward(ctx, *grads):
        by_output = dict(zip(spec.outputs, grads))
        wanted = [by_output[o] for o in spec.grad_outputs]
        if all(g is None for g in wanted):
            return (None,) * len(names)
        wanted = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                  for g, (shape, dtype, device) in zip(wanted, ctx.grad_like)]
        if getattr(ctx, "functorch", False):
            # under torch.func: the backward kernels on the plain tensors (first order only: a
            # nested transform would see constants, so it is refused)
            if ctx.nested:
                _first_order_only(spec.name)(ctx)
            result = bop(*map(_unwrap, (*wanted, *ctx.saved_tensors)), *ctx.context, ctx.backend)
        else:
            result = bop(*wanted, *ctx.saved_tensors, *ctx.context, ctx.backend)
        by_input = dict(zip(spec.grad_inputs, (result,) if len(spec.grad_inputs) == 1 else result))
        return tuple(by_input.get(n) for n in names)

    op.register_autograd(backward, setup_context=setup_context)

    def function_forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    def function_setup_context(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.functorch = True
        ctx.nested = (torch._C._functorch.maybe_current_level() or 0) > 1   # e.g. grad(grad(f))
        ctx.mark_non_differentiable(*(o for name, o in zip(spec.outputs, output) if name not in spec.grad_outputs))

    function = type(f"{spec.name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(function_forward), "setup_context": staticmethod(function_setup_context),
        "backward": staticmethod(backward)})
    # a setup_context (even one that keeps nothing) is what torch.func's transforms require
    bop.register_autograd(_first_order_only(spec.name), setup_context=lambda ctx, inputs, output: None)
    return Defined(spec, op, bop, function)


def _flop_formula(op: str, fn: Callable) -> None:
    """Register ``fn(*op args) -> FLOPs`` with ``torch.utils.flop_counter`` (which also passes the
    outputs as ``out_val``: not needed here)."""
    register_flop_formula(getattr(torch.ops.vidkern, op), get_raw=True)(lambda *args, out_val=None, **kw: fn(*args, **kw))


def _first_order_only(op: str):
    """Autograd of a ``*_backward`` custom op: second-order gradients are not implemented (SPEC §5).
    Without this, torch would fail with an opaque "no autograd formula" error."""
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"vidkern.{op}: second-order gradients (double backward, e.g. autograd.grad(..., create_graph=True) "
            f"then a second backward) are not implemented by the fused kernels; backend='reference' supports them")
    return backward


def _unwrap(t):
    """The plain tensor under torch.func's wrappers (the backward kernels take real tensors)."""
    while isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


class FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses ``create_graph=True`` (grad mode on inside the backward)
    with the documented ``NotImplementedError``, for results computed partly by torch ops whose own
    double backward fails with an opaque error (hsda's SDPA strategies: ATen's CPU flash backward
    has no derivative). It refuses at the first backward, where that graph would be built."""

    @staticmethod
    def forward(x, op):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[1]
        # torch.func's grad runs every backward with grad mode on (to allow nesting): not a refusal
        ctx.functorch = torch._C._functorch.peek_interpreter_stack() is not None

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled() and not ctx.functorch:
            _first_order_only(ctx.op)(ctx, grad)
        return grad, None


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


# =========================================================================== the declarations
def pattern_arg(pattern: str, group_ids: Optional[torch.Tensor]):
    """The custom ops carry a pattern as ``(name, ids)`` (a schema has no union type); backends,
    kernels and the reference take it as one value: the ids tensor, or the name."""
    return group_ids if group_ids is not None else pattern


def _hsda_to_backend(args: dict) -> dict:
    out = dict(args)
    if "grid" in out:
        out["grid"] = tuple(out["grid"])
    if "pattern" in out:
        out["pattern"] = pattern_arg(out["pattern"], out.pop("group_ids"))
    return out


def attended_pairs(q_shape, grid, pattern, group_ids, num_global_heads) -> int:
    """Sum over heads and batch of the (query, key) pairs attended (SPEC §4: pairs actually attended)."""
    b, h, n, _ = q_shape
    if pattern == "explicit":
        known = patterns.known_host_ids(group_ids)     # e.g. grouped token order's ids, made by vidkern
        if known is None and group_ids.device.type == "meta":
            raise ValueError("FLOPs of an explicit pattern need its group ids; count on real tensors, not meta")
        sizes = (known or patterns.host_ids(group_ids)).sizes
    else:
        sizes = torch.tensor(patterns.group_sizes(pattern, grid))
    sparse = int((sizes.long() ** 2).sum())
    return b * (num_global_heads * n * n + (h - num_global_heads) * sparse)


def _channels(args: dict) -> dict:
    return {"channels": args["x"].shape[-1]}


def _no_elements(args: dict) -> bool:
    return args["x"].numel() == 0


def _no_batch(args: dict) -> bool:
    return args["x"].shape[0] == 0


HSDA = OpSpec(
    "hsda",
    "(Tensor q, Tensor k, Tensor v, int[] grid, str pattern, Tensor? group_ids, int num_global_heads, "
    "float scale, str backend) -> (Tensor, Tensor)",
    outputs=("out", "lse"), reference=reference.hsda,
    facts=lambda a: {"head_dim": a["q"].shape[-1]}, empty=lambda a: a["q"].numel() == 0,
    # out (B, H, N, d) laid out as (B, N, H, d), as every backend writes it; lse (B, H, N)
    fake=lambda q, *_: (sdpa.token_major_empty(q), q.new_empty(q.shape[:-1], dtype=accumulation_dtype(q.dtype))),
    grad_inputs=("q", "k", "v"), grad_outputs=("out",), saved=("q", "k", "v", "out", "lse"),
    context=("grid", "pattern", "group_ids", "num_global_heads", "scale"),
    to_backend=_hsda_to_backend,
    # QK^T and PV; the backward recomputes QK^T, then dV, dP, dQ, dK (FlashAttention's 2.5x)
    flops=lambda q, k, v, grid, pattern, ids, hg, *_: 4 * q.shape[-1] * attended_pairs(q.shape, grid, pattern,
                                                                                               ids, hg),
    backward_flops=lambda g, q, k, v, out, lse, grid, pattern, ids, hg, *_: (
        10 * q.shape[-1] * attended_pairs(q.shape, grid, pattern, ids, hg)),
)

FEATURE_SUMMARY = OpSpec(
    "feature_summary", "(Tensor x, str backend) -> (Tensor, Tensor)",
    outputs=("f", "stats"),   # f (B, D); stats (B, 3, D) in the accumulation dtype
    reference=reference.feature_summary, facts=_channels, empty=_no_elements,
    fake=lambda x, backend: (x.new_empty(x.shape[0], x.shape[2]),
                             x.new_empty(x.shape[0], 3, x.shape[2], dtype=accumulation_dtype(x.dtype))),
    grad_inputs=("x",), grad_outputs=("f",), saved=("x", "f", "stats"),
)

TEAM_GATE = OpSpec(
    "team_gate", "(Tensor x, Tensor h, str backend) -> (Tensor, Tensor)",
    outputs=("y", "s"),       # y like x; s (B, N), the token softmax, in the accumulation dtype
    reference=reference.team_gate, facts=_channels, empty=_no_elements,
    fake=lambda x, h, backend: (_empty_like(x), x.new_empty(x.shape[:2], dtype=accumulation_dtype(x.dtype))),
    grad_inputs=("x", "h"), grad_outputs=("y",), saved=("x", "h", "s"),
)


def _select_values(args: dict, traced: bool = False) -> None:
    if traced:   # the reference path, perhaps traced by torch.compile: an assert in the graph
        checks.assert_index_range("start", args["start"], args["x"].shape[1])
    else:        # inside the op, on real data (the call was traced: its values were unknown)
        checks.index_range("start", args["start"], args["x"].shape[1], asynchronous=True)


ORTHOGONAL_SELECT = OpSpec(
    "orthogonal_select", "(Tensor x, int k, Tensor start, str backend, bool check_values) -> Tensor",
    outputs=("idx",), reference=reference.orthogonal_select, empty=_no_batch,
    fake=lambda x, k, *_: x.new_empty(x.shape[0], k, dtype=torch.long),
    check_values=_select_values,
    flops=lambda x, k, *_: 2 * x.shape[0] * (k - 1) * x.shape[1] * x.shape[2],   # a cosine row per step
)


def _merge_values(args: dict, traced: bool = False) -> None:
    if traced:   # the reference path, perhaps traced by torch.compile: an assert in the graph
        checks.assert_index_range("idx", args["idx"], args["x"].shape[1], "token indices", distinct=True)
        return
    # inside the op, on real data (the call was traced: idx and tau were unknown)
    checks.index_range("idx", args["idx"], args["x"].shape[1], "token indices", asynchronous=True, distinct=True)
    checks.finite("tau", args["tau"], positive=True)


def _merge_fake(u, idx, x, e, *_):
    b, length = x.shape[:2]
    lp, acc = idx.shape[1], accumulation_dtype(x.dtype)
    return (x.new_empty(b, lp, x.shape[2]), e.new_empty(b, lp, e.shape[2]),
            x.new_empty(b, length, dtype=acc), x.new_empty(b, lp, dtype=acc))


SOFT_MERGE = OpSpec(
    "soft_merge",
    "(Tensor u, Tensor idx, Tensor x, Tensor e, float tau, str backend, bool check_values) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    outputs=("a", "p", "row_lse", "col_sum"), returns=("a", "p"),
    reference=reference.soft_merge, empty=_no_batch,
    facts=lambda a: {"meta_tokens": a["idx"].shape[1], "token_width": a["x"].shape[-1]},
    fake=_merge_fake,
    grad_inputs=("u", "x", "e"), grad_outputs=("a", "p"),
    saved=("u", "idx", "x", "e", "a", "p", "row_lse", "col_sum"), context=("tau",),
    check_values=_merge_values,
    # U V^T, C^T X, C^T E; the backward: U V^T again, C dA, C dP, X dA^T, E dP^T, dS V, dS^T U
    flops=lambda u, idx, x, e, *_: 2 * u.shape[0] * u.shape[1] * idx.shape[1] * (u.shape[2] + x.shape[-1]
                                                                                        + e.shape[-1]),
    backward_flops=lambda ga, gp, u, idx, x, e, *_: (
        2 * u.shape[0] * u.shape[1] * idx.shape[1] * (3 * u.shape[2] + 2 * x.shape[-1] + 2 * e.shape[-1])),
)

#: op name -> its declaration
SPECS = {s.name: s for s in (HSDA, FEATURE_SUMMARY, TEAM_GATE, ORTHOGONAL_SELECT, SOFT_MERGE)}
#: op name -> its custom ops
DEFINED = {name: define(spec) for name, spec in SPECS.items()}


def call(name: str, *args):
    """Run op ``name``'s forward custom op (autograd through its backward op): all its outputs."""
    defined = DEFINED[name]
    # (not while torch.compile traces: the custom op stays opaque there, and torch 2.13's dynamo
    # reads a functorch interpreter of its own on that stack)
    if (defined.function is not None and not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None):
        return defined.function.apply(*args)        # torch.func.grad / vjp / jacrev
    return defined.op(*args)


def run(name: str, backend: Optional[str] = None, **args):
    """Op ``name`` on checked arguments (the schema's, by name, less ``backend``): pick the backend
    (:func:`vidkern.dispatch.select` on the first tensor's device and dtype and ``spec.facts``),
    then run the reference (differentiated by autograd) when that backend is the reference or the
    inputs are empty, else the custom op. Returns ``spec.public``: one tensor, or a tuple."""
    from . import dispatch
    spec = SPECS[name]
    first = args[spec.arg_names[0]]
    be = dispatch.select(dispatch.Inputs(name, first.device, first.dtype, **spec.facts(args)), backend)
    if be.native_autograd or spec.empty(args):
        if args.get("check_values") and spec.check_values is not None:
            spec.check_values(args, traced=True)
        return spec.reference(**spec.backend_kwargs(args))
    values = dict(args, backend=be.name)
    outs = call(name, *(values[n] for n in spec.arg_names))
    outs = dict(zip(spec.outputs, outs if isinstance(outs, tuple) else (outs,)))
    picked = tuple(outs[o] for o in spec.public)
    return picked[0] if len(picked) == 1 else picked


# torch (2.14) counts SDPA's CUDA kernels but not ATen's CPU flash kernel, which SDPA runs on CPU:
# hsda's split and views strategies would otherwise count no FLOPs for their SDPA heads there.

if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default not in _flop_registry:
    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _cpu_sdpa_flops(query, key, value, *args, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)
