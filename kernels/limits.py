"""The one home of every limit and constant the kernels and their callers share.

Importable without triton (it needs only torch), so the backends' capability checks
(:mod:`vidkern.backends`), the SDPA strategy rule (:mod:`vidkern.sdpa`), the AOT check
(:mod:`vidkern.aot`), the float64 reference and the kernels themselves read the same values. The
CUDA C++ sources hold no copy either: they are compiled with :func:`cpp_defines` (``setup.py``
and the emulator build, ``vidkern.backends.cuda.load_emulator``) and refuse to compile without.
"""
from __future__ import annotations

import torch

#: SPEC §3.1: ``xh = X / max(||X||, NORM_EPS)`` (STTM's normalised features, every backend).
NORM_EPS = 1e-12

#: Head dims the HSDA Triton kernels are compiled for (a constexpr each; others pad up to the next
#: one in the launcher but dispatch declines them, since only these are checked by ``vidkern.aot``).
HSDA_HEAD_DIMS = (32, 64, 128)
#: Largest head dim with a verified, spill-free forward and backward, per dtype class: float32's
#: tf32x3 backward spills registers above 64.
HSDA_MAX_HEAD_DIM = {"half": 128, "fp32": 64}

#: Sparse groups of at most this many tokens run in packed tiles (``_hsda_packed_*``), per dtype
#: class: the tile kernel's smallest half-precision tiles (64 x 64 backward) would issue at least 4x
#: the useful products at 32 tokens a group (4096 / 32^2). float32 packs groups of at most 8 (tiles
#: of 16 rows): its tf32x3 backward spills at 32 rows whatever the warps (``vidkern.aot``).
PACKED_GROUP_MAX = {"half": 32, "fp32": 8}

#: TEAM's fused kernels hold a whole row of channels per token (Triton's row kernels; the CUDA
#: team_gate backward keeps (1 + 8 warps) x D floats in shared memory): ViT-L's 1024 at most.
TEAM_MAX_CHANNELS = 1024


#: Soft merge materialises its ``(L, L')`` score matrices (SPEC §3.2) while ``L' <= 2 D``: the
#: ``(B, L, L')`` scratch is then no more than a small multiple of the ``(B, L, D)`` tokens, so memory
#: stays ``O((L + L') D)`` as the spec asks, and every product is one batched GEMM (cuBLAS on a GPU:
#: the Triton backend's materialised path, ``vidkern.kernels.merge``; the reference's autograd on a
#: CPU, ``vidkern.dispatch.RULES``). Wider merges (the long clip, ``L' = 8 D``) stream.
MERGE_MATERIALISE_MAX_RATIO = 2
#: ... and while a row of ``L'`` scores fits one program of the row kernels (``merge_row_config``):
#: ``L' <= 2 D`` up to ViT-L's D = 1024
MERGE_MATERIALISE_MAX_META = 2048


def merge_materialises(meta_tokens: int, width: int) -> bool:
    """Whether a soft merge of ``meta_tokens`` (``L'``) onto ``width``-channel tokens (``D``) holds
    its ``(L, L')`` scores (:data:`MERGE_MATERIALISE_MAX_RATIO`)."""
    return meta_tokens <= min(MERGE_MATERIALISE_MAX_RATIO * width, MERGE_MATERIALISE_MAX_META)


def dtype_class(dtype: torch.dtype) -> str:
    """``"fp32"`` or ``"half"`` (float16/bfloat16): the key of the per-dtype-class limits."""
    return "fp32" if dtype == torch.float32 else "half"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where every backend accumulates and keeps its statistics (log-sum-exps, sums): float64
    stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def hsda_head_dim_reasons(head_dim, dtype) -> list:
    """Why the HSDA Triton kernels decline ``head_dim`` in ``dtype`` (``[]``: they take it)."""
    if head_dim is None:
        return []
    if head_dim not in HSDA_HEAD_DIMS:
        return [f"head dim {head_dim} is not one of {', '.join(map(str, HSDA_HEAD_DIMS))} (the head dims "
                "compiled and checked by python -m vidkern.aot)"]
    cap = HSDA_MAX_HEAD_DIM[dtype_class(dtype)] if dtype in (torch.float16, torch.bfloat16, torch.float32) else None
    if cap is not None and head_dim > cap:
        return [f"{str(dtype).replace('torch.', '')} with head dim {head_dim} > {cap}: its backward spills "
                "registers (use bf16/fp16)"]
    return []


def cpp_defines() -> list:
    """The compiler flags that give ``csrc/`` these values (``VK_NORM_EPS``, ``VK_TEAM_MAX_CHANNELS``)."""
    return [f"-DVK_NORM_EPS={NORM_EPS!r}f", f"-DVK_TEAM_MAX_CHANNELS={TEAM_MAX_CHANNELS}"]
