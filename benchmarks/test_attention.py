"""Head-split sparse-dense attention (SPEC §1.2): vidkern against the ways people write it today.

Providers: ``reference`` (dense masked, eager), ``triton`` (vidkern's fused kernels),
``torch`` (vidkern's per-group path),
``compile`` (torch.compile of the reference), ``masked_sdpa`` (SDPA with a boolean mask — the
naive way), ``global_sdpa`` (plain attention on every head: the cost of not being sparse),
``flex`` (FlexAttention, compiled, with the same groups as a mask_mod), ``flash_attn`` and
``xformers`` (global attention on every head, when importable).
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import vidkern
from vidkern import patterns, reference as R
from cases import BATCH, DEVICE, DTYPE, GRID, N, SIZES
from conftest import INTERPRET, MODES, note_provider, skip_provider

SPLITS = {"hsda": lambda h: h // 2, "sparse_dense": lambda h: 0}
GLOBAL_ONLY = ("global_sdpa", "flash_attn", "xformers")


def pairs(hg, heads):
    sizes = torch.bincount(patterns.group_ids("checkerboard", GRID))
    return BATCH * (hg * N * N + (heads - hg) * int((sizes ** 2).sum()))


def _mask(hg, heads):
    ids = patterns.group_ids("checkerboard", GRID, DEVICE)
    return (ids[:, None] == ids[None]) | (torch.arange(heads, device=DEVICE)[:, None, None] < hg)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(R.hsda, dynamic=False)


def _flex(hg, heads):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    ids = patterns.group_ids("checkerboard", GRID, DEVICE)

    def same_group_or_global(b, h, q_idx, kv_idx):
        return (h < hg) | (ids[q_idx] == ids[kv_idx])
    block_mask = create_block_mask(same_group_or_global, None, heads, N, N, device=DEVICE)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _bshd(fn):
    """flash-attn and xformers take (B, N, H, d)."""
    return lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def provider_fn(provider, hg, heads, mode):
    if provider == "reference":
        return lambda q, k, v: vidkern.hsda(q, k, v, GRID, hg, backend="reference")
    if provider == "torch":
        return lambda q, k, v: vidkern.hsda(q, k, v, GRID, hg, backend="torch")
    if provider == "triton":
        if DEVICE == "cpu" and not INTERPRET:
            skip_provider("triton", "needs a CUDA device (VIDKERN_BENCH_INTERPRET=1 times Triton's interpreter on CPU)")
        if DEVICE == "cpu":
            note_provider("triton", "Triton's interpreter on CPU (numpy per tile): a correctness run, not a GPU timing")
        return lambda q, k, v: vidkern.hsda(q, k, v, GRID, hg, backend="triton")
    if provider == "compile":
        return lambda q, k, v: _compiled_reference()(q, k, v, GRID, hg)
    if provider == "masked_sdpa":
        mask = _mask(hg, heads)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if provider in GLOBAL_ONLY:
        note_provider(provider, "plain global attention on every head (the cost of not being sparse)")
    if provider == "global_sdpa":
        return F.scaled_dot_product_attention
    if provider == "flex":
        if DEVICE == "cpu" and mode != "fwd":
            skip_provider("flex", f"FlexAttention has no CPU backward in torch {torch.__version__} (forward only here)")
        return _flex(hg, heads)
    if provider in ("flash_attn", "xformers"):
        if DEVICE != "cuda" or DTYPE not in (torch.float16, torch.bfloat16):
            skip_provider(provider, "needs a CUDA device and fp16/bf16")
        try:
            if provider == "flash_attn":
                from flash_attn import flash_attn_func
                return _bshd(flash_attn_func)
            import xformers.ops as xops
            return _bshd(xops.memory_efficient_attention)
        except ImportError as exc:
            skip_provider(provider, f"not importable ({exc})")
    raise ValueError(provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["reference", "triton", "torch", "compile", "masked_sdpa", "global_sdpa",
                                      "flex", "flash_attn", "xformers"])
def test_attention(measure, provider, size, split, mode):
    heads, d = SIZES[size]["heads"], SIZES[size]["dim"] // SIZES[size]["heads"]
    hg = SPLITS[split](heads)
    fn = provider_fn(provider, hg, heads, mode)
    q, k, v = [torch.randn(BATCH, heads, N, d, device=DEVICE, dtype=DTYPE, requires_grad=mode != "fwd")
               for _ in range(3)]
    fwd = 4 * d * pairs(heads if provider in GLOBAL_ONLY else hg, heads)   # each provider's own work
    elt = q.element_size() * q.numel()
    measure(fn, (q, k, v), case=f"attention {split} ViT-{size} B={BATCH} {mode}", provider=provider, mode=mode,
            flops={"fwd": fwd, "bwd": 2.5 * fwd}, nbytes={"fwd": 4 * elt, "bwd": 8 * elt}, dtype=DTYPE)
