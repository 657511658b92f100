"""Backends, registered in priority order: cuda (the ``vidkern._C`` extension), triton (CUDA),
torch, reference. Each op runs on the first backend of ``dispatch.order(op)`` that can run it for
the inputs' device, dtype and shape (``python -m vidkern.info`` lists the order, the per-op
preferences and the reasons a backend is skipped). Adding one: ``docs/adding-a-backend.md``."""
from .. import dispatch
from .cuda import CudaBackend
from .pytorch import TorchBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

# The CUDA C++ TEAM kernels come before the Triton ones: 16-byte vector loads, and the token axis
# of feature_summary split over more blocks when B x channel blocks is too few for the GPU.
# (Neither has been timed on a GPU yet; the benchmarks compare them.)
dispatch.register(CudaBackend(), priority=5)
dispatch.register(TritonBackend(), priority=10)
dispatch.register(TorchBackend(), priority=30)
dispatch.register(ReferenceBackend(), priority=100)
