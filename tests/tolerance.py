"""The tolerance rule of VERIFY.md (flash-attention's): a backend's error against the float64
reference may be at most 2x the error of the reference itself run in the backend's dtype, plus a
small floor (relative to the values' scale)."""
import torch

# The floor is relative to the largest true value: half an ulp of the dtype at that scale (the
# rounding of the output alone; bf16 2^-8, fp16 2^-11), so a correct kernel whose reference run
# happened to round luckily still passes, and a 1% error does not.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(name, out, truth, ref_lowp, factor=2.0):
    """``out``: backend result; ``truth``: reference in float64; ``ref_lowp``: reference in out's dtype."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != {ref_lowp.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element never written?)"
    err, ref_err = max_err(out, truth), max_err(ref_lowp, truth)
    scale = truth.abs().max().item() if truth.numel() else 0.0
    bound = factor * ref_err + FLOOR[out.dtype] * max(scale, 1e-3)
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (reference in {out.dtype}: {ref_err:.3g})"


def run_with_grads(fn, inputs, grads):
    """Outputs of ``fn(*inputs)`` and the gradients of every floating input for output grads ``grads``."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    gs = torch.autograd.grad(outs, diff, [g.to(o.dtype) for g, o in zip(grads, outs)])
    return outs, gs


def check_against_reference(name, fn, ref_fn, inputs, dtype, grads=None):
    """Compare ``fn`` (backend) with ``ref_fn`` (reference) in ``dtype`` against float64 truth,
    outputs and every input gradient."""
    cast = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    # Truth is the float64 reference on the inputs as the backend sees them (rounded to ``dtype``,
    # as flash-attention's tests do), so rounding the inputs does not count as the backend's error.
    wide = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in cast]
    truth_out = ref_fn(*wide)
    truth_out = truth_out if isinstance(truth_out, tuple) else (truth_out,)
    grads = grads or [torch.randn(o.shape, dtype=torch.float64) for o in truth_out]
    truth, truth_g = run_with_grads(ref_fn, wide, grads)
    low, low_g = run_with_grads(ref_fn, cast, grads)
    out, out_g = run_with_grads(fn, cast, grads)
    for i, (o, t, r) in enumerate(zip(out, truth, low)):
        assert_close(f"{name} output {i}", o, t, r)
    for i, (o, t, r) in enumerate(zip(out_g, truth_g, low_g)):
        assert_close(f"{name} grad {i}", o, t, r)
