"""The ``reference`` backend: :mod:`vidkern.reference` itself, differentiated by autograd.

Slow and memory-hungry (dense ``(N, N)`` and ``(L, L')`` matrices) but runs any float dtype on
any device; it is the last resort of automatic dispatch and the ground truth of the tests.
"""
import torch

from .. import reference
from ..checks import FLOAT_DTYPES
from ..dispatch import OPS, Backend


class ReferenceBackend(Backend):
    name = "reference"
    ops = frozenset(OPS)
    devices = frozenset({"cpu", "cuda"})
    dtypes = {"cpu": frozenset(FLOAT_DTYPES), "cuda": frozenset(FLOAT_DTYPES)}
    native_autograd = True

    group_mean = staticmethod(reference.group_mean)

    def not_supported_reasons(self, inputs):
        reasons = super().not_supported_reasons(inputs)
        if inputs.device.type == "cuda" and not torch.cuda.is_available():
            reasons.append("CUDA is not available")
        return reasons
