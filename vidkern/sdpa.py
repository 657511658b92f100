"""HSDA strategies built on ``torch.nn.functional.scaled_dot_product_attention`` (issue 14).

:func:`vidkern.hsda` runs one of three exact strategies (:data:`STRATEGIES`); each computes the
same attention (SPEC §1.2), so they differ only in which kernels do the work:

- ``"fused"``: every head in one ``vidkern::hsda`` custom op on the selected backend (the Triton
  kernel on CUDA, the gathered per-group flash attention of the torch backend on CPU).
- ``"split"``: the global heads through SDPA (cuDNN/flash on CUDA, ATen's flash kernel on CPU)
  on their head slice — a view, no copy — and the sparse heads through the custom op.
- ``"views"``: tokens in *grouped* order (``token_order="grouped"``: each group's tokens
  contiguous, ``patterns.grouped_order``), so the sparse heads are block-diagonal attention over
  contiguous runs: equal-size groups run as one SDPA call over a view that folds the groups into
  a batch axis (``(B, Hs, c * size, d) -> (B, Hs * c, size, d)`` or ``(B * c, Hs, size, d)``,
  whichever the strides allow without a copy), unequal ones as one call per run. No gather and
  no custom kernel: every head runs on SDPA.

SDPA's autograd gives the backward of the SDPA parts. Every strategy returns its ``(B, H, N, d)``
output laid out as ``(B, N, H, d)`` (:func:`token_major_empty`; the parts are concatenated in
that layout), so the output projection's ``o.transpose(1, 2).reshape(B, N, H * d)`` is a view.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .kernels import limits

STRATEGIES = ("fused", "split", "views")
TOKEN_ORDERS = ("natural", "grouped")


def default_strategy(device: torch.device, token_order: str, largest_group: Optional[int] = None,
                     dtype: torch.dtype = torch.bfloat16) -> str:
    """The rule :func:`vidkern.hsda` applies when neither ``strategy`` nor ``backend`` is given
    (``largest_group``: the sparse heads' largest group, ``None`` when unknown or all heads global).

    - natural tokens: ``"split"`` — the global heads on SDPA (cuDNN, which published measurements
      put at 1.2-1.5x FlashAttention-2 on Hopper), the sparse heads on the automatic backend
      (Triton on CUDA, torch on CPU).
    - grouped tokens: ``"views"`` — every head on SDPA, no gather; except on CUDA when every
      sparse group is small enough for the packed Triton kernel (``limits.PACKED_GROUP_MAX``,
      e.g. temporal heads): ``"split"``, since a flash kernel pads each group of 8 to its
      128-row tile (256x the useful products) where packed tiles issue 2x.

    Why, on the work model (``python -m vidkern.work --reference``: H200, ViT-B B = 32, bf16,
    fwd + bwd, our kernels priced from their sm_90 SASS with softmax and products in series, SDPA
    calls at FlashAttention-2's published rate; dense on all heads = 1.00): checkerboard — views
    0.79, split 0.82, fused 0.86; temporal — split 0.56, fused 0.59, views 1.32. Measured on CPU (ViT-S, B = 1, 6 heads,
    d = 64, fp32, 2 threads, fwd+bwd; global SDPA = 1.00): checkerboard — views 0.83, split 0.88,
    fused 0.94; temporal — views 0.57, split 0.63-0.65, fused 0.68, hence views for every group
    size on CPU. Not yet measured on a GPU (``make gpu-check`` times all three beside cuDNN and
    flash).
    """
    if token_order != "grouped":
        return "split"
    small = largest_group is not None and largest_group <= limits.PACKED_GROUP_MAX[limits.dtype_class(dtype)]
    return "split" if device.type == "cuda" and small else "views"


def token_major_empty(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``(B, H, N, d)`` tensor like ``q`` laid out as ``(B, N, H, d)``, the layout
    the attention's output projection reads (``o.transpose(1, 2).reshape(B, N, H * d)`` is then a
    view, not a copy). The fake implementation of ``vidkern::hsda`` reports the same strides."""
    b, h, n, d = q.shape
    return torch.empty((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def attention(q, k, v, scale):
    """SDPA on ``(B, H, N, d)`` tensors (any strides SDPA accepts).

    On CPU, ATen's flash backward gives each thread whole (batch, head) pairs, so 3 heads on 2
    threads take as long as 4 (ViT-S's global half at B = 1: 95 ms where 6 heads take 148). The
    queries are then split into ``f`` row blocks (a view) against the same keys (expanded: a copy
    of K and V only), so the pairs divide evenly among the threads: 79 ms. (Not while
    ``torch.compile`` traces: the thread count is a runtime fact, and inductor lowers SDPA itself.)"""
    b, h, n = q.shape[:3]
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        threads = torch.get_num_threads()
        f = threads // math.gcd(b * h, threads)
        if f > 1 and n % f == 0 and n >= 64 * f:
            qf = q.unflatten(2, (f, n // f)).flatten(1, 2)
            kf, vf = (t.unsqueeze(2).expand(b, h, f, *t.shape[2:]).flatten(1, 2) for t in (k, v))
            out = F.scaled_dot_product_attention(qf, kf, vf, scale=scale)
            return out.unflatten(1, (h, f)).flatten(2, 3)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _fold(t, count: int, size: int):
    """``t (B, Hs, count * size, d)`` -> a 4-D tensor with the ``count`` groups folded into a
    batch-like axis, and the function that unfolds SDPA's result of the same shape."""
    b, hs = t.shape[:2]
    u = t.unflatten(2, (count, size))                         # (B, Hs, count, size, d): a view
    if u.stride(1) == count * u.stride(2):                    # heads outside tokens: fold into heads
        return u.flatten(1, 2), lambda o: o.unflatten(1, (hs, count)).flatten(2, 3)
    w = u.transpose(1, 2)                                     # (B, count, Hs, size, d)
    if w.stride(0) == count * w.stride(1):                    # tokens outside heads ((B, N, H, d) views)
        return w.flatten(0, 1), lambda o: o.unflatten(0, (b, count)).transpose(1, 2).flatten(2, 3)
    return u.flatten(1, 2), lambda o: o.unflatten(1, (hs, count)).flatten(2, 3)   # copies once


def _runs(sizes) -> list:
    """``[(start, count, size)]``: maximal runs of consecutive equal-size groups (empty ids skipped)."""
    runs, start = [], 0
    for size in sizes:
        if size == 0:
            continue
        if runs and runs[-1][2] == size and runs[-1][0] + runs[-1][1] * size == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, size)
        else:
            runs.append((start, 1, size))
        start += size
    return runs


def block_diagonal(q, k, v, sizes, scale):
    """Attention within contiguous groups of ``sizes`` tokens (in order) of ``q, k, v (B, Hs, N, d)``."""
    runs = _runs(sizes)
    spans = [count * size for _, count, size in runs]
    outs = []
    for (_, count, size), qp, kp, vp in zip(runs, *(_parts(t, 2, spans) for t in (q, k, v))):
        (qf, unfold), (kf, _), (vf, _) = (_fold(t, count, size) for t in (qp, kp, vp))
        outs.append(unfold(attention(qf, kf, vf, scale)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _parts(t, dim: int, sizes: list) -> tuple:
    """``t`` cut along ``dim`` into consecutive parts of ``sizes`` from its start (anything after
    the last part is left out, as slices would).

    One ``split``, not a slice per part: autograd's backward of a slice writes its gradient into a
    zero-filled tensor of ``t``'s full shape and sums those, where ``split``'s concatenates the
    parts' gradients once (CPU, ViT-S's 3 + 3 heads: 6 fills and 3 adds of a (B, H, N, d) tensor
    saved per layer)."""
    rest = t.shape[dim] - sum(sizes)
    if len(sizes) == 1 and not rest:
        return (t,)
    return t.split(sizes + [rest] if rest else sizes, dim=dim)[:len(sizes)]


def split(q, k, v, hg: int, sparse, scale):
    """Global heads ``[0, hg)`` on SDPA, the others by ``sparse(q, k, v)`` on their head slice."""
    h = q.shape[1]
    runs = [(n, fn) for n, fn in ((hg, lambda *qkv: attention(*qkv, scale)), (h - hg, sparse)) if n]
    cuts = (_parts(t, 1, [n for n, _ in runs]) for t in (q, k, v))
    parts = [fn(*qkv) for (_, fn), qkv in zip(runs, zip(*cuts))]
    # concatenated as (B, N, H, d), the layout the output projection reads
    return torch.cat([p.transpose(1, 2) for p in parts], dim=2).transpose(1, 2)
