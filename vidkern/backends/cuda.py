"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/`` (TEAM's ``feature_summary`` and
``team_gate``; STTM's ``orthogonal_select`` and ``soft_merge``), built by ``setup.py`` into
``vidkern._C`` and registered with ``TORCH_LIBRARY`` as ``torch.ops.vidkern_cuda.*``.

The same kernel source also compiles for the host through the CPU emulator (``csrc/emulate.h``,
VERIFY.md §3): :func:`load_emulator` builds it from a source checkout and registers
``torch.ops.vidkern_emu.*`` for CPU tensors. The backend then runs on CPU tensors too, but only
when asked for by name (``backend="cuda"``), as the Triton interpreter does: it exists to verify
the kernels, not to be fast.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Optional

import torch

from .. import dispatch
from ..dispatch import Backend
from ..kernels import limits

_KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
_emulator_loaded = False


@dispatch.availability_check
def extension_error() -> Optional[str]:
    """Why ``vidkern._C`` cannot be used (None: it is loaded)."""
    import importlib.util
    # find_spec tells "never built" (no file) from "built but does not load" (torch upgraded since,
    # a missing library): their ImportError messages are not a reliable way to tell them apart.
    if importlib.util.find_spec("vidkern._C") is not None:
        try:
            from .. import _C  # noqa: F401  (loading the library registers torch.ops.vidkern_cuda)
            return None
        except (ImportError, OSError) as exc:
            return f"vidkern._C is built but does not load ({exc}); reinstall vidkern"
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    elif shutil.which("nvcc") is None:
        why = "no CUDA toolkit (nvcc) was found when vidkern was installed"
    else:
        why = "vidkern was installed without it (VIDKERN_SKIP_CUDA_BUILD=1, or torch missing at build time)"
    return (f"the CUDA extension vidkern._C is not built: {why}; see the README's install section "
            "(pip install --no-build-isolation)")


def emulator_loaded() -> bool:
    return _emulator_loaded


def load_emulator(build_directory: Optional[str] = None, verbose: bool = False) -> None:
    """Build (once; cached by torch's extension builder) and load the CPU-emulated twin of the CUDA
    kernels, registered as ``torch.ops.vidkern_emu.*``. Needs a source checkout (``csrc/``), a
    C++20 compiler and ninja."""
    global _emulator_loaded
    if _emulator_loaded:
        return
    sources = sorted(glob.glob(os.path.join(CSRC, "emulated", "*.cpp")))
    if not sources:
        raise RuntimeError(f"no CUDA kernel sources under {CSRC}: the emulator builds from a source checkout")
    from torch.utils import cpp_extension
    cpp_extension.load(name="vidkern_emu", sources=sources, extra_include_paths=[CSRC],
                       extra_cflags=["-O2", "-std=c++20", "-DVIDKERN_EMULATE", "-pthread", *limits.cpp_defines()],
                       extra_ldflags=["-pthread"], build_directory=build_directory, is_python_module=False,
                       verbose=verbose)
    _emulator_loaded = True


def kernels(device: torch.device):
    """The op namespace holding the kernels for tensors on ``device``."""
    return torch.ops.vidkern_cuda if device.type == "cuda" else torch.ops.vidkern_emu


class CudaBackend(Backend):
    name = "cuda"
    ops = frozenset({"feature_summary", "team_gate", "orthogonal_select", "soft_merge"})
    devices = frozenset({"cuda", "cpu"})
    dtypes = {"cuda": _KERNEL_DTYPES, "cpu": _KERNEL_DTYPES}
    max_channels = limits.TEAM_MAX_CHANNELS   # csrc/team.cu is compiled with the same value

    def unavailable_reason(self):
        return None if emulator_loaded() else extension_error()

    def not_supported_reasons(self, inputs):
        reasons = super().not_supported_reasons(inputs)
        if inputs.device.type == "cuda":
            if emulator_loaded() and extension_error():
                reasons.append(extension_error())
            if not torch.cuda.is_available():
                reasons.append("CUDA is not available")
        elif inputs.device.type == "cpu":
            if not emulator_loaded():
                reasons.append("on CPU the CUDA kernels run only through the emulator "
                               "(vidkern.backends.cuda.load_emulator(), used by the tests)")
            elif not inputs.forced:
                reasons.append("the emulated kernels run only when backend='cuda' is asked for")
        return reasons

    def feature_summary_forward(self, x):
        return tuple(kernels(x.device).feature_summary_fwd(x))

    def feature_summary_backward(self, grad_f, x, f, stats):
        return kernels(x.device).feature_summary_bwd(grad_f, x, stats)

    def team_gate_forward(self, x, h):
        return tuple(kernels(x.device).team_gate_fwd(x, h))

    def team_gate_backward(self, grad_y, x, h, s):
        return tuple(kernels(x.device).team_gate_bwd(grad_y, x, h, s))

    def orthogonal_select(self, x, k, start):
        return kernels(x.device).orthogonal_select(x, k, start.long())

    def soft_merge_forward(self, u, idx, x, e, tau):
        return tuple(kernels(x.device).soft_merge_fwd(u, idx.contiguous(), x, e, tau))

    def soft_merge_backward(self, grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum, tau):
        return tuple(kernels(x.device).soft_merge_bwd(grad_a, grad_p, u, idx.contiguous(), x, e, a, p, row_lse,
                                                      col_sum, tau))
