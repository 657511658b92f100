"""What every Triton launcher of ``vidkern.kernels`` shares: the device it launches on, the
grid limit on the batch axis, and the launch tables of the running Triton version.

*Device.* Triton launches on the *current* CUDA device and its current stream, not on the device
of the tensors it is handed: inputs on ``cuda:1`` while ``cuda:0`` is current would run on device
0 with device-1 pointers. Every launcher is decorated with :func:`on_input_device`, which makes the
inputs' device current (and with it that device's current stream) for the launches inside.

*Grid.* CUDA limits grid axes 1 and 2 to 65535 programs (axis 0 to 2^31 - 1). Launchers that put
the batch on axis 1 or 2 launch once per slice of :func:`batch_chunks`; ``t[slice]`` keeps
``t``'s strides and offsets its pointer, so the kernels index each chunk from batch row 0.

*Triton version.* Register allocation differs between Triton releases (layouts, pipelining,
the bundled ``ptxas``), so a configuration that compiles without spills on one may spill on
another. A launch table is written for the newest supported Triton, with the entries that must
differ on older ones beside it; :func:`for_triton` lays those over the table for the running
version, read once (:data:`TRITON_VERSION`). ``python -m vidkern.aot`` asks the launchers for
their configurations, so it checks exactly the table the running Triton gets.
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from typing import Optional

import torch
import triton

MAX_GRID_YZ = 65535   # programs on grid axis 1 or 2 (read at call time: tests lower it)


def device_guard(t: torch.Tensor):
    """Context manager making ``t``'s CUDA device current; a no-op for CPU tensors (Triton's
    interpreter has no devices, and ``torch.cuda.device`` rejects a CPU device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def on_input_device(launcher):
    """Decorator for a launcher whose first argument is one of its input tensors (all inputs are on
    one device: ``vidkern.checks`` validates that): every launch inside runs on that device."""
    @functools.wraps(launcher)
    def guarded(first, *args, **kwargs):
        with device_guard(first):   # looked up per call, so a test can record it
            return launcher(first, *args, **kwargs)
    return guarded


def batch_chunks(b: int) -> list:
    """Slices of ``range(b)`` of at most :data:`MAX_GRID_YZ` rows each (none for ``b = 0``)."""
    return [slice(s, min(b, s + MAX_GRID_YZ)) for s in range(0, b, MAX_GRID_YZ)]


def version_tuple(text: str) -> tuple:
    """``"3.6.0"`` -> ``(3, 6, 0)``; a local or pre-release suffix (``+git1a2b``, ``rc1``) is ignored."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in m.groups(default="0"))


TRITON_VERSION = version_tuple(triton.__version__)   # read once, at import


def for_triton(table: dict, older: dict, version: tuple = None) -> dict:
    """The launch table for Triton ``version`` (default: the running one): ``table`` (written for
    the newest supported Triton) with the entries of ``older[bound]`` laid over it for every
    ``bound`` (a version tuple such as ``(3, 8)``) that ``version`` predates; the oldest such
    bound's entries win."""
    version = TRITON_VERSION if version is None else tuple(version)
    picked = dict(table)
    for bound in sorted(older, reverse=True):
        if version < tuple(bound):
            picked.update(older[bound])
    return picked


def dot_precision(dtype) -> str:
    """``input_precision`` of ``tl.dot`` for inputs of ``dtype``. float32: three TF32 products per
    product ("tf32x3": tensor cores, float32-level error; plain IEEE products run on FMA units and
    spill); float16/bfloat16: native tensor-core products (the argument is ignored for them)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Config:
    """A kernel's launch configuration, the one form every kernel family uses: its tile
    constexprs by name (``Config.of(BLOCK_N=32, BLOCK_D=64, num_warps=4)``), warps, and pipeline
    stages (``None``: Triton's default). ``cfg.BLOCK_N`` reads a tile, ``kernel[grid](...,
    **cfg.launch())`` launches with it, :meth:`aot` declares it to ``vidkern.aot``."""
    tiles: tuple = ()                 # ((constexpr name, value), ...), ordered and hashable
    num_warps: int = 4
    num_stages: Optional[int] = None

    @classmethod
    def of(cls, num_warps: int = 4, num_stages: Optional[int] = None, **tiles) -> "Config":
        return cls(tuple(tiles.items()), num_warps, num_stages)

    def __getattr__(self, name: str):   # reached only for names that are not fields: the tiles
        for key, value in object.__getattribute__(self, "tiles"):
            if key == name:
                return value
        raise AttributeError(f"{type(self).__name__} has no tile {name!r}")

    @property
    def constexprs(self) -> dict:
        return dict(self.tiles)

    def launch(self) -> dict:
        """The launch keywords: the tiles, ``num_warps`` and (when set) ``num_stages``."""
        return dict(self.tiles, num_warps=self.num_warps,
                    **({} if self.num_stages is None else {"num_stages": self.num_stages}))

    def aot(self, family: str, name: str, fn, dtype, **constexprs) -> "AotSpec":
        """The :class:`AotSpec` of kernel ``fn`` launched with this configuration (``constexprs``:
        the kernel's other compile-time arguments)."""
        return AotSpec(family, name, fn, dtype, dict(self.tiles, **constexprs), self.num_warps, self.num_stages)


@dataclass(frozen=True)
class AotSpec:
    """One configuration a launcher can pick, declared for ``python -m vidkern.aot``: the kernel
    (``family`` and short ``name``, e.g. ``("team", "gate_bwd")``), the inputs' dtype, the
    constexprs the launcher passes, warps and stages (``None``: Triton's default). Every kernel
    module exports ``aot_specs(dtype)``, built from the same functions its launchers call.

    What ``vidkern.aot`` compiles is not built from a spec: it runs the module's
    ``aot_launches(dtype)`` (the launchers themselves, at the reference shapes and at shapes that
    reach every declared configuration) with Triton's launch replaced by a recorder, and compiles
    each recorded launch exactly as Triton's JIT would (its own specialisation: an int argument
    equal to 1 becomes a constant, pointers and ints divisible by 16 get a divisibility hint).
    The declared specs are what the recorded launches are checked against: every launch must match
    one, and every one must be launched (:meth:`matches`)."""
    family: str
    name: str
    fn: object
    dtype: torch.dtype
    constexprs: dict
    num_warps: int
    num_stages: Optional[int] = None

    @property
    def debug(self) -> bool:
        """The work-counting variant (``DEBUG=True``), launched only by the tests."""
        return bool(self.constexprs.get("DEBUG"))

    @property
    def label(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in self.constexprs.items()
                         if k not in ("EPS", "PRECISION", "DEBUG") and not k.islower())
        stages = "" if self.num_stages is None else f" s={self.num_stages}"
        debug = " debug" if self.debug else ""
        return f"{_DTYPE_NAMES[self.dtype]} {shown} w={self.num_warps}{stages}{debug}".replace("  ", " ")

    def matches(self, fn, constexprs: dict, num_warps: int, num_stages: int, default_stages: int) -> bool:
        """Whether a recorded launch of ``fn`` (its constexprs by name, warps, stages) is this
        configuration: the same kernel, warps and stages, and every declared constexpr at the
        declared value (the launch also has the JIT's own constants: unit strides)."""
        stages = default_stages if self.num_stages is None else self.num_stages
        return (fn is self.fn and num_warps == self.num_warps and num_stages == stages
                and all(name in constexprs and constexprs[name] == value for name, value in self.constexprs.items()))
