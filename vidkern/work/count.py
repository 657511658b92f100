"""Counting work by running the kernels, for :mod:`vidkern.work`'s ``--measure`` and its tests.

:func:`triton_counts` tallies, under ``TRITON_INTERPRET=1``, every launch of an interpreted Triton
kernel: each program's ``tl.load``/``tl.store`` goes through the interpreter's builder
(``create_masked_load``/``create_masked_store``; the unmasked forms call those), and so does each
``tl.dot`` (``create_dot``) and ``tl.debug_barrier`` (``create_barrier``). Bytes are the *active*
lanes' (a masked-off lane issues no memory access on a GPU) times the element size; MACs are
``M * N * K`` per ``tl.dot`` whatever its mask (padding is issued work). Torch ops the launcher
itself calls between kernels (a ``softmax`` over ``(B, N)``, an ``index_put``) are recorded too,
as ``aten.<op>`` with the logical bytes of their tensor arguments and results — an estimate of
their traffic, shown beside the formula but not part of the agreement tests.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch

_VIEW_LIKE = ("empty", "new_empty", "detach", "alias", "lift_fresh", "_unsafe_view", "set_", "resize_",
              "_local_scalar_dense", "sym_", "is_", "_to_copy_meta")


@dataclass
class Counted:
    """One counted launch (or torch op, ``kernel = "aten.<name>"``)."""
    kernel: str
    grid: tuple = (1, 1, 1)
    load_bytes: int = 0
    store_bytes: int = 0
    macs: int = 0
    dots: dict = field(default_factory=dict)      # input dtype/precision -> MACs
    barriers: int = 0

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def bytes(self) -> int:
        return self.load_bytes + self.store_bytes


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _itemsize(tl_dtype) -> int:
    return max(1, tl_dtype.primitive_bitwidth // 8)


class _AtenCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name.startswith(_VIEW_LIKE):
            return out
        nbytes = 0
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                nbytes += t.numel() * t.element_size()
        macs = 0
        if name in ("mm", "bmm", "addmm", "baddbmm"):
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            macs = a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        self.sink.append(Counted(f"aten.{name}", load_bytes=nbytes, macs=macs))
        return out


@contextlib.contextmanager
def triton_counts(torch_ops: bool = True):
    """``with triton_counts() as launches:`` — ``launches`` fills with one :class:`Counted` per
    interpreted kernel launch (and, with ``torch_ops``, per torch op between them), in order.
    Needs ``TRITON_INTERPRET=1`` set before triton was imported."""
    if not interpreting():
        raise RuntimeError("counting Triton work needs TRITON_INTERPRET=1 set before triton is imported")
    from triton.runtime import interpreter as I

    b = I.interpreter_builder
    launches: list = []
    current: list = [None]

    def masked_load(ptrs, mask, *args, _orig=type(b).create_masked_load):
        c = current[0]
        if c is not None:
            c.load_bytes += int(mask.data.sum()) * _itemsize(ptrs.get_element_ty())
        return _orig(b, ptrs, mask, *args)

    def masked_store(ptrs, value, mask, *args, _orig=type(b).create_masked_store):
        c = current[0]
        if c is not None:
            c.store_bytes += int(mask.data.sum()) * _itemsize(ptrs.get_element_ty())
        return _orig(b, ptrs, value, mask, *args)

    def dot(a, bb, d, input_precision, *args, _orig=type(b).create_dot):
        c = current[0]
        if c is not None:
            m, k = a.data.shape[-2:]
            n = bb.data.shape[-1]
            macs = int(m * n * k)
            c.macs += macs
            key = f"{a.dtype.scalar}/{input_precision}"
            c.dots[key] = c.dots.get(key, 0) + macs
        return _orig(b, a, bb, d, input_precision, *args)

    def barrier(_orig=type(b).create_barrier):
        if current[0] is not None:
            current[0].barriers += 1
        return _orig(b)

    grid_call = I.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        from torch.utils._python_dispatch import _disable_current_modes
        outer = current[0]
        rec = Counted(self.fn.__name__)
        current[0] = rec
        try:
            with _disable_current_modes():   # the interpreter's own host copies are not the kernel's work
                grid = self.grid(args) if callable(self.grid) else self.grid
                rec.grid = tuple(grid) + (1,) * (3 - len(grid)) if not callable(self.grid) else rec.grid
                result = grid_call(self, *args, **kwargs)
        finally:
            current[0] = outer
        if outer is None:
            launches.append(rec)
        return result

    patched = dict(create_masked_load=masked_load, create_masked_store=masked_store, create_dot=dot,
                   create_barrier=barrier)
    for name, fn in patched.items():
        setattr(b, name, fn)
    I.GridExecutor.__call__ = launch
    mode = _AtenCounter(launches) if torch_ops else contextlib.nullcontext()
    try:
        with mode:
            yield launches
    finally:
        I.GridExecutor.__call__ = grid_call
        for name in patched:
            delattr(b, name)


def dot_rate(counted: Counted) -> str:
    """The MAC_RATE key of a counted launch's products (its most-used dot precision)."""
    if not counted.dots:
        return "bf16"
    key = max(counted.dots, key=counted.dots.get)
    dtype, precision = key.split("/")
    if dtype == "fp32":
        return "tf32x3" if "3" in precision.lower() else "tf32"
    return dtype
