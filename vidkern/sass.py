"""A static report of a compiled kernel, read from its SASS (no GPU): what ``python -m vidkern.aot``
adds to each configuration's resource line, and what :mod:`vidkern.work` prices.

For one kernel (a cubin's function): registers, shared memory, the CTAs an SM holds at once
(:func:`ctas_per_sm`), the tensor-core instruction kind of its main loop (``HGMMA``: Hopper's
warpgroup MMA, ``wgmma``; ``HMMA``: the warp-level ``mma.sync``; ``none``), and per main-loop
iteration the instructions one warp issues, by class (:data:`CLASSES`).

*Loops.* A loop is a backward branch: a ``BRA`` to an earlier address; its body is the code from
the target to the branch. The *main loop* is the most deeply nested loop whose own body (nested
loops' bodies excluded) does the kernel's work: tensor-core MACs, or, in a kernel without them, global loads
and stores, or else instructions; of equally deep ones, the one doing the most. A kernel without
MMA that does fp32 FMAs also reports its FMA loop (SIMT products), chosen the same way by FMAs. Its counts are of its whole body, nested loops once. Counts
are static: every instruction of the body once, both arms of any branch inside it (a masked tail
path is counted as if taken). A kernel without a backward branch has no loop (``loop = None``):
its counts are then those of the whole function, run once.

How to read SASS here: ``cuobjdump -sass`` (shipped in the triton wheel) on a Triton kernel's
``asm["cubin"]`` or on the built extension; ``reviews/kernels-sass-read.md`` in the shared notes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

#: opcode classes counted per iteration: class -> opcodes (the part before the first ".")
CLASSES = {
    "mma": ("HGMMA", "HMMA", "IMMA", "DMMA"),
    "hgmma": ("HGMMA",),                                 # sm_90 warpgroup MMA (wgmma)
    "hmma": ("HMMA",),                                   # warp-level mma.sync
    "mufu": ("MUFU",),                                   # exp2, rcp, rsqrt, ...: 16 lanes/clk/SM on sm_80/90
    "bar": ("BAR", "BSYNC", "WARPSYNC", "SYNCS"),         # block barriers, warp reconvergence, mbarriers
    "ldg": ("LDG", "LDGSTS", "UTMALDG", "UBLKCP"),       # global loads (plain, cp.async, TMA)
    "stg": ("STG", "UTMASTG", "RED", "ATOMG"),           # global stores and reductions
    "lds": ("LDS", "LDSM"),                              # shared-memory loads
    "sts": ("STS",),
    "shfl": ("SHFL",),
}
#: per-SM limits by architecture: registers, shared memory (bytes, the opt-in maximum a CTA may use
#: plus the 1 KiB the driver reserves per CTA), resident warps and CTAs (CUDA C Programming Guide,
#: "Compute Capabilities", table 21, for 8.0 and 9.0)
SM_LIMITS = {80: dict(regs=65536, shared=164 * 1024, warps=64, ctas=32),
             90: dict(regs=65536, shared=228 * 1024, warps=64, ctas=32)}
RESERVED_SHARED = 1024   # per CTA, sm_80 and later
REG_GRANULE = 256        # registers are allocated per warp in units of 256


def ctas_per_sm(arch: int, regs: int, warps: int, shared: int) -> int:
    """CTAs of ``warps`` warps, ``regs`` registers a thread and ``shared`` bytes of shared memory
    one SM of ``arch`` holds at once (the occupancy calculator's rule; 0 if one does not fit)."""
    lim = SM_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // REG_GRANULE) * REG_GRANULE
    by_regs = lim["regs"] // (per_warp * warps)
    by_shared = lim["shared"] // (shared + RESERVED_SHARED)
    return max(0, min(by_regs, by_shared, lim["warps"] // warps, lim["ctas"]))


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_\w+):")
_TARGET = re.compile(r"`?\(?(\.L_\w+)\)?`?|(0x[0-9a-f]+)")


@dataclass
class Instr:
    addr: int
    op: str          # the opcode, e.g. "HGMMA"
    mods: str        # its modifiers, e.g. ".64x64x16.F32.BF16"
    operands: str


@dataclass
class Loop:
    start: int       # address of the branch target (the loop head)
    end: int         # address of the backward branch
    counts: dict = field(default_factory=dict)

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and (self.start, self.end) != (other.start, other.end)


def parse(text: str) -> list:
    """The instructions of one function's SASS listing, in address order (branch targets resolved
    from labels to addresses in ``operands`` of ``BRA``: ``Instr.operands`` keeps the text)."""
    out, labels, pending = [], {}, []
    for line in text.splitlines():
        if m := _LABEL.match(line):
            pending.append(m.group(1))
            continue
        if m := _INSTR.search(line):
            ins = Instr(int(m.group(1), 16), m.group(2), m.group(3), m.group(4).strip())
            for name in pending:
                labels[name] = ins.addr
            pending = []
            out.append(ins)
    for ins in out:
        if ins.op in ("BRA", "JMP") and (m := _TARGET.search(ins.operands)):
            target = labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)
            ins.operands = str(target) if target is not None else ins.operands
    return out


_HGMMA_SHAPE = re.compile(r"^\.?(\d+)x(\d+)x(\d+)")
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "1684": (16, 8, 4), "884": (8, 8, 4)}
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def mma_macs(ins: Instr) -> int:
    """Multiply-adds one warp's tensor-core instruction does: ``HMMA.16816`` is m16n8k16 (2048);
    ``HGMMA.64xNx16`` is a warpgroup's 64 x N x 16, a quarter of it per warp."""
    if ins.op == "HMMA":
        m, n, k = _HMMA_SHAPES.get(ins.mods.split(".")[1] if ins.mods.count(".") else "", (0, 0, 0))
        return m * n * k
    if ins.op == "HGMMA" and (s := _HGMMA_SHAPE.search((ins.mods + ins.operands).lstrip("."))):
        m, n, k = map(int, s.groups())
        return m * n * k // 4
    return 0


def access_bytes(ins: Instr) -> int:
    """Bytes one warp's global load or store moves with every lane active (``LDG.E.128``: 16 a
    lane; no width modifier: 4); 0 for anything else (a TMA copy's size is not in its opcode)."""
    if ins.op not in ("LDG", "LDGSTS", "STG", "RED", "ATOMG"):
        return 0
    width = next((_WIDTH[m] for m in ins.mods.split(".") if m in _WIDTH), 4)
    return 32 * width


def count(instrs) -> dict:
    """Instructions by class (:data:`CLASSES`), plus ``"instr"``: all of them but ``NOP``;
    ``"macs"``: tensor-core multiply-adds (:func:`mma_macs`); ``"ffma"``: fp32 FMAs (SIMT products);
    ``"gbytes"``: global bytes with every lane active (:func:`access_bytes`) — all per warp."""
    out = {name: 0 for name in CLASSES}
    out.update(instr=0, macs=0, ffma=0, gbytes=0)
    for ins in instrs:
        if ins.op == "NOP":
            continue
        out["instr"] += 1
        out["macs"] += mma_macs(ins)
        out["ffma"] += ins.op == "FFMA"
        out["gbytes"] += access_bytes(ins)
        for name, ops in CLASSES.items():
            if ins.op in ops:
                out[name] += 1
    return out


def loops(instrs) -> list:
    """Every loop (backward branch) with its body's counts."""
    found = []
    for i, ins in enumerate(instrs):
        if ins.op in ("BRA", "JMP") and ins.operands.isdigit() and int(ins.operands) < ins.addr:
            start = int(ins.operands)
            body = [x for x in instrs if start <= x.addr <= ins.addr]
            found.append(Loop(start, ins.addr, count(body)))
    return found


def own(found: list, lp: Loop) -> dict:
    """``lp``'s counts less those of the loops nested directly in it: what its own body issues."""
    nested = [o for o in found if lp.contains(o)]
    direct = [o for o in nested if not any(x.contains(o) for x in nested)]
    return {k: v - sum(o.counts[k] for o in direct) for k, v in lp.counts.items()}


WORK = ("macs", "gbytes")    # what a main loop does, in order: tensor-core MACs, else global bytes


def main_loop(found: list, work: tuple = WORK) -> Optional[Loop]:
    """The innermost loop that does the kernel's work in its own body (:func:`own`): the first
    measure of ``work`` any loop's own body has (by default tensor-core MACs, else global bytes),
    else instructions. Of those loops, the most deeply nested (an inner loop runs more trips than
    the loop around it), then the one doing the most; None when there is no loop."""
    if not found:
        return None
    mine = {id(lp): own(found, lp) for lp in found}
    measure = next((k for k in work if any(mine[id(lp)][k] for lp in found)), "instr")
    working = [lp for lp in found if mine[id(lp)][measure] > 0] or found

    def depth(lp):
        return sum(o.contains(lp) for o in found)
    return max(working, key=lambda lp: (depth(lp), mine[id(lp)][measure], -(lp.end - lp.start)))


def mma_kind(instrs) -> str:
    ops = {ins.op for ins in instrs}
    return "HGMMA" if "HGMMA" in ops else "HMMA" if "HMMA" in ops else "none"


@dataclass
class Report:
    """The static report of one compiled kernel (module docstring)."""
    arch: int
    regs: int
    shared: int
    warps: int                  # per CTA (0: unknown, as for the extension's kernels)
    mma: str                    # tensor-core instruction kind of the main loop (or of the kernel without one)
    loop: Optional[dict]        # per main-loop iteration, per warp: counts by class; None: no loop
    kernel: dict                # the whole function's counts (static)
    outer: Optional[dict] = None  # the innermost loop enclosing the main loop: its body's counts
                                  # (main loop included); None: the main loop is outermost
    fma_loop: Optional[dict] = None   # a kernel without MMA: the innermost loop doing fp32 FMAs (SIMT
    fma_outer: Optional[dict] = None  # products) and the loop around it, priced for a launch with products

    @property
    def ctas_per_sm(self) -> int:
        return ctas_per_sm(self.arch, self.regs, self.warps, self.shared) if self.warps else 0

    def text(self) -> str:
        c = self.loop or self.kernel
        where = "loop" if self.loop else "once"
        return (f"{self.mma} {where}: {c['instr']} instr, {c['mma']} mma, {c['mufu']} mufu, {c['bar']} bar, "
                f"{c['ldg']} ldg, {c['stg']} stg")


def report(sass_text: str, arch: int, regs: int, shared: int, warps: int) -> Report:
    """The :class:`Report` of one function's SASS listing."""
    instrs = parse(sass_text)
    found = loops(instrs)
    lp = main_loop(found)
    body = [x for x in instrs if lp.start <= x.addr <= lp.end] if lp else instrs
    outer = enclosing(found, lp) if lp else None
    rep = Report(arch, regs, shared, warps, mma_kind(body), lp.counts if lp else None, count(instrs),
                 outer.counts if outer else None)
    if found and not rep.kernel["mma"] and any(own(found, x)["ffma"] for x in found):
        fl = main_loop(found, ("ffma",))
        around = enclosing(found, fl)
        rep.fma_loop, rep.fma_outer = fl.counts, around.counts if around else None
    return rep


def enclosing(found: list, inner: Loop) -> Optional[Loop]:
    """The innermost loop of ``found`` that strictly contains ``inner`` (None: ``inner`` is outermost)."""
    around = [lp for lp in found if lp.contains(inner)]
    return min(around, key=lambda lp: lp.end - lp.start) if around else None


def functions(sass_text: str) -> dict:
    """``cuobjdump -sass`` output -> {(arch, mangled function name): its listing}."""
    code, arch, name = {}, 0, None
    for line in sass_text.splitlines():
        if m := re.search(r"code for sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.search(r"Function : (\S+)", line):
            name = (arch, m.group(1))
            code[name] = []
        elif name is not None:
            code[name].append(line)
    return {k: "\n".join(v) for k, v in code.items()}
