"""The work model beside published GPU figures: how far to trust it (``python -m vidkern.work
--calibrate``; the table in ``docs/verify.md``).

Kernels whose H100/H200 speed is published, priced exactly as the model prices ours:

- **dense attention**: our Triton HSDA kernel with every head global is a FlashAttention-2-style
  kernel (one program per 128-query tile, online softmax over 64-key tiles). Priced on the
  :data:`~vidkern.work.machine.H100` at the FA3 paper's setup (16k tokens a batch, hidden 2048:
  32 heads at d=64, 16 at d=128), beside FA2, cuDNN and FA3 as published. The model must not
  price it faster than the best published kernel (FA3) for the same work.
- **a copy** (1 GiB in, 1 GiB out) on the H200, beside the copy measured on it.
- **a large matmul** (bf16 8192^3, 128 x 128 output tiles) on the H100, beside cuBLAS.

The copy and the matmul calibrate a constant each (the copy bandwidth, ``SUSTAINED``), so they
agree by construction; the attention rows test the terms read from the compiled code.
"""
from __future__ import annotations

from . import Launch, Shape, cdiv, records
from .machine import H100, H200
from .sdpa import PUBLISHED, PUBLISHED_LENGTHS, copy_launch

HIDDEN, TOKENS = 2048, 16384     # FA3 paper, §4.1


def attention_rows(machine=H100) -> list:
    """One row per (direction, head dim, length): the model's TFLOP/s of our dense kernel and the
    published FA2, cuDNN and FA3 figures (FLOPs counted as the paper does)."""
    out = []
    for direction in ("forward", "backward"):
        for d in (64, 128):
            for i, n in enumerate(PUBLISHED_LENGTHS):
                h = HIDDEN // d
                shape = Shape(B=max(1, TOKENS // n), H=h, N=n, L=n, d=d, grid=(1, 1, n), num_global_heads=h)
                total = records("hsda", direction, "triton", shape, machine=machine)[-1]
                flops = 4 * n * n * d * shape.B * h * (2.5 if direction == "backward" else 1)
                row = dict(what="attention (ours, every head global)", direction=direction, d=d, length=n,
                           model_us=total["model_us"], bound=total["bound"],
                           model=flops / total["model_us"] / 1e6, unit="TFLOP/s")
                row.update({k: PUBLISHED[(k, direction, d)][i] for k in ("fa2", "cudnn", "fa3")})
                out.append(row)
    return out


def copy_row(machine=H200) -> dict:
    n = 1 << 30
    launch = copy_launch("copy", 2 * n)
    t = launch.price(machine)["model_us"]
    return dict(what="copy, 1 GiB", model=2 * n / t / 1e3, published=4.3e3, unit="GB/s",
                source="gpu-benches h200.txt (copy ~4.3 TB/s)", model_us=t)


def matmul_row(machine=H100) -> dict:
    n = 8192
    launch = Launch("aten.mm", cdiv(n, 128) ** 2, 3 * n * n * 2, n ** 3, rate="bf16", unique=3 * n * n * 2)
    t = launch.price(machine)["model_us"]
    return dict(what="matmul bf16 8192^3", model=2 * n ** 3 / t / 1e6, published=798.0, unit="TFLOP/s",
                source="pranjalssh/fast.cu (cuBLAS)", model_us=t)


def markdown() -> str:
    lines = ["| kernel | dir | d | tokens | model TFLOP/s (bound) | FA2 | cuDNN | FA3 | model / FA3 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in attention_rows():
        lines.append(f"| {r['what']} | {r['direction'][:3]} | {r['d']} | {r['length']:,} | {r['model']:.0f} "
                     f"({r['bound']}) | {r['fa2']} | {r['cudnn']} | {r['fa3']} | {r['model'] / r['fa3']:.2f} |")
    lines += ["", "| kernel | model | published | unit | source |", "|---|---|---|---|---|"]
    for r in (copy_row(), matmul_row()):
        lines.append(f"| {r['what']} | {r['model']:,.0f} | {r['published']:,.0f} | {r['unit']} | {r['source']} |")
    return "\n".join(lines)
