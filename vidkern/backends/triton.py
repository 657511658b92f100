"""The ``triton`` backend: fused Triton kernels (``vidkern.kernels``: ``hsda``, ``team``, ``selection``, ``merge``), CUDA devices.

On a machine without CUDA the same kernels run in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported — only when asked for by name
(``backend="triton"``), never by automatic dispatch, since the interpreter is slow; and not for
bfloat16 ``hsda``/``soft_merge``, whose ``tl.dot`` products the interpreter gets wrong.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import dispatch
from ..dispatch import Backend
from ..kernels import limits

_KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
_DOT_OPS = frozenset({"hsda", "soft_merge"})   # ops whose kernels use tl.dot (selection and TEAM use none)
INTERPRETED_BF16_DOT = ("Triton's interpreter computes bf16 tl.dot wrongly (errors ~1e8); "
                        "bf16 Triton kernels are checked on a GPU")


@dispatch.availability_check
def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        from ..kernels import hsda  # noqa: F401
    except Exception as exc:  # a broken triton must leave the other backends usable
        return f"triton not importable ({type(exc).__name__}: {exc})"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"
    ops = frozenset({"hsda", "feature_summary", "team_gate", "orthogonal_select", "soft_merge"})
    devices = frozenset({"cuda", "cpu"})
    dtypes = {"cuda": _KERNEL_DTYPES, "cpu": _KERNEL_DTYPES}
    max_head_dim = max(limits.HSDA_HEAD_DIMS)
    max_channels = limits.TEAM_MAX_CHANNELS

    def unavailable_reason(self):
        return _import_error()

    def not_supported_reasons(self, inputs):
        reasons = super().not_supported_reasons(inputs)
        if inputs.device.type == "cuda" and not torch.cuda.is_available():
            reasons.append("CUDA is not available")
        reasons += limits.hsda_head_dim_reasons(inputs.head_dim, inputs.dtype)
        if inputs.device.type == "cpu":
            if inputs.dtype == torch.bfloat16 and inputs.op in _DOT_OPS:
                reasons.append(INTERPRETED_BF16_DOT)
            if not interpreting():
                reasons.append("needs a CUDA device (on CPU only Triton's interpreter runs: TRITON_INTERPRET=1)")
            elif not inputs.forced:
                reasons.append("the interpreter runs only when backend='triton' is asked for")
        return reasons

    def hsda_forward(self, q, k, v, grid, pattern, num_global_heads, scale):
        from ..kernels import hsda
        return hsda.hsda_forward(q, k, v, grid, pattern, num_global_heads, scale)

    def hsda_backward(self, grad_out, q, k, v, out, lse, grid, pattern, num_global_heads, scale):
        from ..kernels import hsda
        return hsda.hsda_backward(grad_out, q, k, v, out, lse, grid, pattern, num_global_heads, scale)

    def feature_summary_forward(self, x):
        from ..kernels import team
        return team.feature_summary_forward(x)

    def feature_summary_backward(self, grad_f, x, f, stats):
        from ..kernels import team
        return team.feature_summary_backward(grad_f, x, f, stats)

    def team_gate_forward(self, x, h):
        from ..kernels import team
        return team.team_gate_forward(x, h)

    def team_gate_backward(self, grad_y, x, h, s):
        from ..kernels import team
        return team.team_gate_backward(grad_y, x, h, s)

    def orthogonal_select(self, x, k, start):
        from ..kernels import selection
        return selection.orthogonal_select(x, k, start)

    def soft_merge_forward(self, u, idx, x, e, tau):
        from ..kernels import merge
        return merge.soft_merge_forward(u, idx, x, e, tau)

    def soft_merge_backward(self, grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum, tau):
        from ..kernels import merge
        return merge.soft_merge_backward(grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum, tau)
