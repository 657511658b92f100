"""Backends, registered in priority order: triton (CUDA), torch, reference."""
from .. import dispatch
from .pytorch import TorchBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

dispatch.register(TritonBackend(), priority=10)
dispatch.register(TorchBackend(), priority=30)
dispatch.register(ReferenceBackend(), priority=100)
