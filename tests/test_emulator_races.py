"""A race check for the CUDA kernels on the CPU emulator (csrc/emulate.h "Schedule jitter").

The emulator's OS threads run in near lock-step, so a missing ``__syncthreads()`` before shared
scratch is reused (a real race on a GPU) gave the right answer anyway. With
``VIDKERN_EMU_JITTER_US`` every thread sleeps a pseudo-random time after each barrier and warp
shuffle: a lagging thread then reads scratch that a faster one has rewritten. Every op of the cuda
backend runs its conformance cases so, against the float64 reference, twice.
"""
import pytest
import torch

from vidkern import conformance, dispatch


def _cases():
    for op in sorted(dispatch.get("cuda").ops):
        for i, case in enumerate(conformance.CASES[op]):
            yield pytest.param(case, id=f"{op}-{i}")


@pytest.mark.parametrize("case", list(_cases()))
def test_cuda_kernels_are_right_under_schedule_jitter(case, cuda_kernel_device, monkeypatch):
    if cuda_kernel_device.type != "cpu":
        pytest.skip("an emulator check; on a GPU compute-sanitizer racecheck runs (make gpu-check)")
    if case.reasons("cuda", cuda_kernel_device, torch.float32):
        pytest.skip("; ".join(case.reasons("cuda", cuda_kernel_device, torch.float32)))
    monkeypatch.setenv("VIDKERN_EMU_JITTER_US", "20000")
    for _ in range(2):
        conformance.check(case, "cuda", torch.float32, cuda_kernel_device)
