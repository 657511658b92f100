"""Backends, registered in priority order (kernel backends arrive in later releases)."""
from .. import dispatch
from .pytorch import TorchBackend
from .reference import ReferenceBackend

dispatch.register(TorchBackend(), priority=30)
dispatch.register(ReferenceBackend(), priority=100)
