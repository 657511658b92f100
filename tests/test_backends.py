"""Backend conformance, generated from what is registered: every backend x every op it declares x
every dtype it declares on this machine's device x the shared awkward cases of
:mod:`vidkern.conformance`, against the float64 reference.

Outputs never written read as NaN (the ``poison`` fixture). A backend that declines a combination when asked for by name (the Triton interpreter's bf16
``tl.dot``, a head dim it does not compile) is skipped with its own reasons. On a machine without
a GPU the ``triton`` kernels run in Triton's interpreter and the ``cuda`` kernels in the CPU
emulator (tests/conftest.py). Kernel-specific tests (tile boundaries, splits, debug counters)
stay beside their kernels (test_triton_*.py, test_cuda_team.py, test_sttm_kernels.py).
"""
import pytest
import torch

import vidkern  # noqa: F401  (registers the backends)
from vidkern import conformance, dispatch
from vidkern.backends.pytorch import TorchBackend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _combinations():
    for name in dispatch.names():
        be = dispatch.get(name)
        for op in sorted(be.ops):
            for dtype in sorted(be.dtypes.get(DEVICE.type, ()), key=DTYPE_NAMES.get):
                for i, case in enumerate(conformance.CASES[op]):
                    yield pytest.param(name, case, dtype, id=f"{name}-{op}-{DTYPE_NAMES[dtype]}-{i}")


@pytest.fixture
def device_of(request):
    """The device a backend's kernels run on here (the cuda backend's emulator on a CPU machine)."""
    def where(backend):
        if backend == "cuda":
            return request.getfixturevalue("cuda_kernel_device")
        return DEVICE
    return where


@pytest.mark.parametrize("backend, case, dtype", list(_combinations()))
def test_backend_conforms(backend, case, dtype, device_of, poison):
    device = device_of(backend)
    reasons = case.reasons(backend, device, dtype)
    if reasons:
        pytest.skip(f"{backend} declines {case.op} on {device.type}/{DTYPE_NAMES[dtype]}: " + "; ".join(reasons))
    conformance.check(case, backend, dtype, device)


def test_every_op_has_cases_and_every_backend_is_covered():
    assert set(conformance.CASES) == set(dispatch.OPS)
    assert all(len(cases) >= 2 for cases in conformance.CASES.values())
    covered = {p.values[0] for p in _combinations()}
    assert covered == set(dispatch.names())


class _ToyBackend(TorchBackend):
    """A new backend: the torch backend's team_gate with its gate applied twice (wrong), the rest
    inherited — what a contributor's first draft might register."""
    name = "toy"
    ops = frozenset({"team_gate", "feature_summary"})

    def team_gate_forward(self, x, h):
        y, s = super().team_gate_forward(x, h)
        return y * 2, s


def test_a_registered_backend_is_held_to_every_case(monkeypatch):
    """Registering is all a backend needs to be tested: the generated cases run on it (and catch the
    toy backend's wrong team_gate, while its inherited feature_summary passes)."""
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    monkeypatch.setattr(dispatch, "_PRIORITY", list(dispatch._PRIORITY))
    dispatch.register(_ToyBackend(), priority=40)
    cpu = torch.device("cpu")
    for case in conformance.CASES["feature_summary"]:
        conformance.check(case, "toy", torch.float32, cpu)
    for case in conformance.CASES["team_gate"]:
        with pytest.raises(AssertionError, match="team_gate"):
            conformance.check(case, "toy", torch.float32, cpu)
