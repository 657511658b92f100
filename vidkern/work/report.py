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
from . import machine as _machine
from .machine import TERMS

COLUMNS = TERMS + ("published_us",)   # the terms table: an SDPA call's published time too

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
    with a model; hsda rows also carry ``dense_us``, SDPA (FA2 at its published rate) on every head."""
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
                    tot = recs[-1]
                    limit = limit_us(tot.get("min_bytes"), tot.get("useful_macs"))
                    rows.append(dict(tot, case=label, launches=recs[:-1], dense_us=dense, limit_us=limit,
                                     share=ratio(limit, tot["model_us"])))
    return rows


def limit_us(min_bytes, useful_macs, machine=None) -> float:
    """The op's own physical limit: its useful MACs at the sustained dense bf16 tensor-core peak, or
    its minimal bytes at the copy bandwidth, whichever is longer."""
    m = machine or _machine.MACHINE
    return max((useful_macs or 0) / m.mac_rate("HGMMA", "bf16"), (min_bytes or 0) / m.hbm) * 1e6


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}"


def markdown(rows=None) -> str:
    rows = reference_rows() if rows is None else rows
    m = _machine.MACHINE
    lines = [f"Work model (vidkern.work) on the {m.name}: a model priced from the compiled sm_90 code, not a "
             f"measurement ({m.hbm / 1e12:.1f} TB/s copy, {m.mac_rate('HGMMA', 'bf16') / 1e12:.0f} T bf16 MAC/s "
             f"sustained on wgmma, 2/3 of it on mma.sync, MUFU 16 and issue 4 a clock per SM, "
             f"{m.launch_s * 1e6:.1f} us a launch; vidkern/work/machine.py).", "",
             "| op | case | dir | backend | launches | MB issued | MB DRAM | MB min | GMAC | macs/useful | steps | "
             "model us | bound | limit us | share of limit | vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        useful = r.get("useful_macs")
        lines.append(
            f"| {r['op']} | {r['case']} | {r['direction'][:3]} | {r['backend']} | {len(r['launches'])} | "
            f"{_fmt_bytes(r['bytes'])} | {_fmt_bytes(r['dram_bytes'])} | {_fmt_bytes(r.get('min_bytes'))} | "
            f"{r['macs'] / 1e9:,.2f} | {ratio(r['macs'], useful) if useful else float('nan'):.2f} | {r['steps']:,} | "
            f"{r['model_us']:,.1f} | {r['bound']} | {r['limit_us']:,.1f} | {r['share']:.0%} | {_vs_dense(r)} |")
    lines += ["", "The terms, summed over each op's launches (us; `python -m vidkern.work OP --json` gives them per "
              "launch):", "", "| op | case | dir | backend | " + " | ".join(t[:-3] for t in COLUMNS) + " |",
              "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['op']} | {r['case']} | {r['direction'][:3]} | {r['backend']} | "
                     + " | ".join(f"{r[t]:,.1f}" for t in COLUMNS) + " |")
    lines += ["", "bound: the term the op's launches spend the most modelled time in (dram, l2, mma, mufu, issue, "
              "latency, launch, or published: an SDPA call at FA2's published rate). limit: the op's useful MACs at "
              "the sustained bf16 peak or its minimal bytes at copy bandwidth, whichever is longer; share = limit / "
              "model. vs dense: model us over SDPA's (FA2 at its published rate) on every head.", "",
              "Saved by the (B, N, H, d) output layout (no copy before the output projection, per forward):"]
    from .sdpa import output_copy
    for label, op, shape in REFERENCE:
        if op == "hsda":
            saved = output_copy(shape)
            lines.append(f"- {label}: {_fmt_bytes(saved.bytes)} MB, {saved.model_us:,.1f} model us")
    return "\n".join(lines)


def _vs_dense(r) -> str:
    return "-" if not r.get("dense_us") else f"{r['model_us'] / r['dense_us']:.2f}"
