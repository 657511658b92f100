"""The work model at the reference shapes, as rows and as a markdown table (``python -m vidkern.work
--reference``, the benchmark report, gpu-check).

Reference shapes (bf16): ViT-B attention and TEAM at B=32 (N = 8x14x14 = 1568, D=768, H=12, d=64;
TEAM also at B=8, its parallelism target, and a B=1 long clip N=12544); sttm_vit_b's two STTM
stages at B=32 — spatial, per frame: 32*8 problems of L=196 -> 98 with CLS attentiveness scores
(K = ceil(1.5*98) = 147 greedy candidates), spatio-temporal: 32 problems of L=784 -> 392 with scores
(K = 588); and the long clip, one problem of L=12544 -> 6272, D=768.
"""
from __future__ import annotations

from . import FORMULAS, PATHS, Shape, _load_formulas, ratio, records

_VIT_B = dict(H=12, d=64, D=768, dtype="bf16")
STAGE1 = dict(B=256, L=196, N=196, num_out=98, scores=True, D=768, dtype="bf16")
STAGE2 = dict(B=32, L=784, N=784, num_out=392, scores=True, D=768, dtype="bf16")
LONG = dict(B=1, L=12544, N=12544, num_out=6272, D=768, dtype="bf16")

#: (label, op, Shape) of the reference cases
REFERENCE = [
    ("ViT-B B=32 checkerboard 6+6", "hsda", Shape(B=32, N=1568, grid=(8, 14, 14), **_VIT_B)),
    ("ViT-B B=32 temporal 6+6", "hsda", Shape(B=32, N=1568, grid=(8, 14, 14), pattern="temporal", **_VIT_B)),
    # the temporal heads alone (T = 8 queries per group): what a tile per group wastes (issue 14)
    ("ViT-B B=32 temporal heads only", "hsda", Shape(B=32, N=1568, grid=(8, 14, 14), pattern="temporal",
                                                     num_global_heads=0, **_VIT_B)),
    ("ViT-B B=32", "feature_summary", Shape(B=32, N=1568, **_VIT_B)),
    ("ViT-B B=8", "feature_summary", Shape(B=8, N=1568, **_VIT_B)),
    ("long clip B=1", "feature_summary", Shape(B=1, N=12544, **_VIT_B)),
    ("ViT-B B=32", "team_gate", Shape(B=32, N=1568, **_VIT_B)),
    ("ViT-B B=8", "team_gate", Shape(B=8, N=1568, **_VIT_B)),
    ("long clip B=1", "team_gate", Shape(B=1, N=12544, **_VIT_B)),
    ("sttm_vit_b stage 1 B=32", "select_meta_tokens", Shape(**STAGE1)),
    ("sttm_vit_b stage 2 B=32", "select_meta_tokens", Shape(**STAGE2)),
    ("long clip", "orthogonal_select", Shape(**LONG)),
    ("long clip, scores", "select_meta_tokens", Shape(**dict(LONG, scores=True))),
    ("sttm_vit_b stage 1 B=32", "soft_merge", Shape(**dict(STAGE1, scores=False))),
    ("sttm_vit_b stage 2 B=32", "soft_merge", Shape(**dict(STAGE2, scores=False))),
    ("long clip", "soft_merge", Shape(**LONG)),
]


def reference_rows(backends=PATHS) -> list:
    """The op-direction totals at every reference shape, for every backend (and hsda SDPA strategy)
    with a model; hsda rows also carry ``dense_us``, the ideal dense kernel on every head."""
    _load_formulas()
    from .sdpa import dense_us
    rows = []
    for label, op, shape in REFERENCE:
        for backend in backends:
            if (op, backend) not in FORMULAS:
                continue
            for direction in ("forward", "backward"):
                recs = records(op, direction, backend, shape)
                if len(recs) > 1:    # selection has no backward
                    dense = dense_us(direction, shape) if op == "hsda" else None
                    rows.append(dict(recs[-1], case=label, launches=recs[:-1], dense_us=dense))
    return rows


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}"


def markdown(rows=None) -> str:
    rows = reference_rows() if rows is None else rows
    lines = ["Counted work model (vidkern.work; an H200 lower bound, not a measurement: "
             "3.7 TB/s, bf16 395 TMAC/s, programs in waves over 132 SMs, 1 us per sequential step).", "",
             "| op | case | dir | backend | launches | programs | MB | MB min | bytes/min | GMAC | "
             "macs/useful | steps | model us | vs dense |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        useful = r.get("useful_macs")
        lines.append(
            f"| {r['op']} | {r['case']} | {r['direction'][:3]} | {r['backend']} | {len(r['launches'])} | "
            f"{r['programs']:,} | {_fmt_bytes(r['bytes'])} | {_fmt_bytes(r.get('min_bytes'))} | "
            f"{ratio(r['bytes'], r.get('min_bytes')):.2f} | {r['macs'] / 1e9:,.2f} | "
            f"{ratio(r['macs'], useful) if useful else float('nan'):.2f} | {r['steps']:,} | {r['model_us']:,.1f} | "
            f"{_vs_dense(r)} |")
    lines += ["", "vs dense: model us over the ideal flash kernel's on every head (vidkern.work.sdpa); the "
              "split and views rows model their SDPA calls as that same ideal kernel.", "",
              "Saved by the (B, N, H, d) output layout (no copy before the output projection, per forward):"]
    from .sdpa import output_copy
    for label, op, shape in REFERENCE:
        if op == "hsda":
            saved = output_copy(shape)
            lines.append(f"- {label}: {_fmt_bytes(saved.bytes)} MB, {saved.model_us:,.1f} model us")
    return "\n".join(lines)


def _vs_dense(r) -> str:
    return "-" if not r.get("dense_us") else f"{r['model_us'] / r['dense_us']:.2f}"
