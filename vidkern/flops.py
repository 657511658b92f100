"""FLOPs and parameters in the papers' convention (SPEC §4).

One multiply-add counts as one FLOP (fvcore's convention, reported as GMACs and called
"GFLOPs" in the papers); only matrix products and convolutions count: Linear layers, attention
``QK^T`` and ``PV`` over the pairs actually attended, Conv3d (the patch embedding included),
STTM's similarity and merge products. A convolution's bias counts one MAC per output element
*(choice: with it the left column of SPEC §4 comes out exactly — e.g. 34.3355 rather than
34.3349 for temporal attention; Linear biases are not counted, as in fvcore)*. Counting uses PyTorch's ``FlopCounterMode``: vidkern's
custom ops register their formulas with ``torch.utils.flop_counter`` (see :mod:`vidkern.library`),
so PyTorch's own counter counts them the same way (``count`` adds the conv-bias term below and
leaves out STTM's selection, as the papers do).

``python -m vidkern.flops NAME [key=value ...]`` prints the table of a preset of
:mod:`vidkern.models` (built on the meta device: no memory, no compute).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

aten = torch.ops.aten

from . import ops  # noqa: F401  (registers the FLOP formulas of the custom ops)


@dataclass
class FlopReport:
    """``gmacs``: forward GMACs (SPEC §4); ``params``: parameter count; ``per_op``: GMACs by op."""

    gmacs: float
    params: int
    per_op: dict

    def table(self) -> str:
        width = max([len(k) for k in self.per_op] + [20])
        lines = [f"{'op':<{width}}  GMACs", f"{'-' * width}  -------"]
        lines += [f"{name:<{width}}  {g:8.3f}" for name, g in sorted(self.per_op.items(), key=lambda kv: -kv[1])]
        lines += [f"{'-' * width}  -------", f"{'total GMACs (papers: GFLOPs)':<{width}}  {self.gmacs:8.2f}",
                  f"{'parameters (M)':<{width}}  {self.params / 1e6:8.2f}"]
        return "\n".join(lines)


def _conv_with_bias_flop(x_shape, w_shape, bias, stride, padding, dilation, transposed, *args, out_shape=None,
                         **kwargs) -> int:
    flops = conv_flop_count(x_shape, w_shape, out_shape, transposed=transposed)
    out_elements = 1
    for size in out_shape:
        out_elements *= size
    return flops + (2 * out_elements if bias is not None else 0)


def _not_counted(*args, **kwargs) -> int:
    return 0


#: Formulas that differ from PyTorch's defaults (see the module docstring). STTM's greedy
#: selection registers its cosine products with torch's counter, but the papers' tables leave
#: selection out, so ``count`` does too.
CUSTOM_FORMULAS = {aten.convolution: _conv_with_bias_flop, aten._convolution: _conv_with_bias_flop,
                   torch.ops.vidkern.orthogonal_select: _not_counted}


def count(model: torch.nn.Module, inputs) -> FlopReport:
    """Count one forward of ``model(*inputs)`` (no gradient). ``inputs`` may live on the meta device.

    It counts what runs: vidkern's custom ops by their formulas (attended pairs), so a model on
    the ``reference`` backend (dense masked attention) counts dense products.
    """
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS) as counter, torch.no_grad():
        model(*inputs)
    per_op = {str(op): flops / 2e9 for op, flops in counter.get_flop_counts()["Global"].items() if flops}
    return FlopReport(gmacs=counter.get_total_flops() / 2e9,
                      params=sum(p.numel() for p in model.parameters()), per_op=per_op)


def count_preset(name: str, batch: int = 1, **overrides) -> FlopReport:
    """GMACs and parameters of a :mod:`vidkern.models` preset, counted on the meta device with the
    ``torch`` backend's custom ops (attended pairs only, whatever ``$VIDKERN_BACKEND`` says)."""
    from . import models
    overrides.setdefault("backend", "torch")
    with torch.device("meta"):
        model = models.create(name, **overrides).eval()
    cfg = model.cfg
    clips = torch.empty(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device="meta")
    return count(model, clips)


def _parse(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # a bare string such as attention=hsda


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        from .models import PRESETS
        print(__doc__.strip() + f"\n\npresets: {', '.join(PRESETS)}")
        return 0 if argv else 2
    name, pairs = argv[0], argv[1:]
    bad = [p for p in pairs if "=" not in p]
    if bad:
        print(f"arguments after NAME must be key=value, got {bad}", file=sys.stderr)
        return 2
    overrides = {k: _parse(v) for k, v in (p.split("=", 1) for p in pairs)}
    try:
        table = count_preset(name, **overrides).table()
    except (ValueError, TypeError) as exc:     # a bad preset name or override: say so, no traceback
        print(f"python -m vidkern.flops: error: {exc}", file=sys.stderr)
        return 2
    print(f"{name} {overrides or ''}".strip())
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
