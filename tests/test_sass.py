"""The static SASS report (``vidkern.sass``): the parser on listings whose answer is known, the
occupancy rule, and — from ``python -m vidkern.aot``'s compiled variants — the tensor-core
instruction kind each kernel is meant to use, with the reason."""
import pytest

from vidkern import sass

LISTING = """
        code for sm_90
                Function : demo
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
.L_x_1:
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0050*/                   MUFU.EX2 R9, R9 ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/              @P0 BRA `(.L_x_1) ;
        /*0080*/                   STG.E desc[UR4][R2.64], R8 ;
        /*0090*/              @!P1 BRA `(.L_x_0) ;
        /*00a0*/                   NOP ;
        /*00b0*/                   EXIT ;
"""


def test_the_parser_finds_loops_and_counts_per_iteration():
    text = sass.functions(LISTING)[(90, "demo")]
    instrs = sass.parse(text)
    assert [i.op for i in instrs][:4] == ["MOV", "S2R", "LDG", "HMMA"]
    found = sass.loops(instrs)
    assert sorted((lp.start, lp.end) for lp in found) == [(0x20, 0x90), (0x40, 0x70)]
    outer, inner = sorted(found, key=lambda lp: lp.start)
    assert outer.counts["mma"] == 2 and outer.counts["hgmma"] == 1 and outer.counts["hmma"] == 1
    assert outer.counts["instr"] == 8 and outer.counts["mufu"] == 1 and outer.counts["bar"] == 1
    assert outer.counts["ldg"] == 1 and outer.counts["stg"] == 1
    assert sass.own(found, outer)["mma"] == 1 and sass.own(found, outer)["instr"] == 4
    # the main loop: the innermost loop doing MACs in its own body (the inner loop's HGMMA)
    main = sass.main_loop(found)
    assert (main.start, main.end) == (0x40, 0x70)
    rep = sass.report(text, 90, regs=128, shared=0, warps=4)
    assert rep.mma == "HGMMA" and rep.loop == main.counts and rep.kernel["instr"] == 11   # NOP not counted
    assert rep.outer == outer.counts and sass.enclosing(found, outer) is None
    # even against a heavier outer body (an inner loop runs more trips); but a loop without MACs of
    # its own is not the main loop
    heavier = LISTING.replace("HMMA.16816.F32 R8, R4, R6, R8", "HGMMA.64x256x16.F32.BF16 R8, gdesc[UR8], R8")
    assert sass.main_loop(sass.loops(sass.parse(sass.functions(heavier)[(90, "demo")]))).start == 0x40
    idle = LISTING.replace("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "FMUL R24, R24, R24")
    assert sass.main_loop(sass.loops(sass.parse(sass.functions(idle)[(90, "demo")]))).start == 0x20
    no_mma = LISTING.replace("HMMA.16816.F32 R8, R4, R6, R8", "FFMA R8, R4, R6, R8").replace(
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "FMUL R24, R24, R24")
    found = sass.loops(sass.parse(sass.functions(no_mma)[(90, "demo")]))
    lp = sass.main_loop(found)
    assert (lp.start, lp.end) == (0x20, 0x90)   # no MMA: the loop whose own body moves global bytes
    # and the FMA loop, for a launch doing SIMT products: the outer loop's FFMA
    fma = sass.report(sass.functions(no_mma)[(90, "demo")], 90, 32, 0, 4)
    assert fma.fma_loop == lp.counts and fma.fma_outer is None and rep.fma_loop is None
    no_ffma = no_mma.replace("FFMA R8, R4, R6, R8", "FADD R8, R4, R6")
    assert sass.report(sass.functions(no_ffma)[(90, "demo")], 90, 32, 0, 4).fma_loop is None
    no_memory = no_mma.replace("LDG.E.128 R4, desc[UR4][R2.64]", "MOV R4, R2").replace(
        "STG.E desc[UR4][R2.64], R8", "MOV R8, R2")
    lp = sass.main_loop(sass.loops(sass.parse(sass.functions(no_memory)[(90, "demo")])))
    assert (lp.start, lp.end) == (0x40, 0x70)   # nor memory: every loop issues instructions; the innermost
    straight = sass.report("\n".join(ln for ln in text.splitlines() if "BRA" not in ln), 90, 32, 0, 4)
    assert straight.loop is None and straight.kernel["mma"] == 2 and straight.outer is None


def test_work_per_instruction():
    """What the model derives iterations from: MACs per warp of each tensor-core shape (a warpgroup
    MMA is shared by its 4 warps), FFMAs, and the global bytes of each access width."""
    text = sass.functions(LISTING)[(90, "demo")]
    counts = sass.report(text, 90, 128, 0, 4).outer
    assert counts["macs"] == 16 * 8 * 16 + 64 * 64 * 16 // 4
    assert counts["gbytes"] == 32 * 16 + 32 * 4          # LDG.E.128 and STG.E
    ins = sass.parse("""
        /*0000*/                   HMMA.1688.F32.TF32 R8, R4, R6, R8 ;
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0020*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R2.64] ;
        /*0040*/                   STG.E.64 desc[UR4][R2.64], R8 ;
        /*0050*/                   FFMA R8, R4, R6, R8 ;
    """)
    assert [sass.mma_macs(i) for i in ins] == [16 * 8 * 8, 64 * 128 * 16 // 4, 0, 0, 0, 0]
    assert [sass.access_bytes(i) for i in ins] == [0, 0, 64, 512, 256, 0]
    assert sass.count(ins)["ffma"] == 1


@pytest.mark.parametrize("arch,regs,warps,shared,ctas", [
    (90, 137, 8, 64 * 1024, 1),      # hsda forward, d = 64: 137 registers hold it to one CTA an SM
    (90, 128, 8, 64 * 1024, 2),      # at 128 registers two fit (the review's maxnreg lead)
    (90, 32, 4, 2 * 1024, 16),       # small kernels: the 64-warp limit
    (90, 33, 4, 0, 12),              # registers go in 256-register warp granules: 33 a thread cost 40
    (90, 32, 1, 0, 32),              # the 32-CTA limit
    (80, 64, 4, 100 * 1024, 1),      # shared memory: 164 KiB an SM on sm_80
    (90, 64, 4, 100 * 1024, 2),      # 228 KiB on sm_90
    (90, 255, 16, 0, 0),             # 16 warps at 255 registers do not fit at all
])
def test_ctas_per_sm(arch, regs, warps, shared, ctas):
    assert sass.ctas_per_sm(arch, regs, warps, shared) == ctas


def _expected(kernel: str, config: str, arch: int) -> str:
    """The tensor-core instruction kind each Triton kernel is meant to compile to, and why.
    sm_80 has only the warp-level ``mma.sync`` (HMMA). On sm_90 Triton emits the warpgroup MMA
    (``wgmma``, HGMMA) for a product whose tile has at least 64 rows for a warpgroup; smaller tiles
    stay on HMMA, which reaches about 2/3 of Hopper's tensor-core peak."""
    products = (kernel.startswith(("hsda fwd", "hsda bwd_dkdv", "hsda bwd_dq", "hsda packed", "sttm merge",
                                   "sttm select_gram")) and not kernel.startswith("sttm merge_rows"))
    if not products:
        return "none"          # TEAM, the greedy steps, norms, the streaming selection, the materialised
        #                        merge's row kernels (its products are cuBLAS GEMMs): no products
    if arch == 80:
        return "HMMA"
    half = config.startswith(("fp16", "bf16"))
    if kernel.startswith("sttm merge"):
        return "HMMA"          # the streamed merge's 16 x 16 tiles (merges with L' <= 2 D run on cuBLAS)
    if kernel == "sttm select_gram":
        return "HGMMA"         # 128 x 128 (16-bit) and 64 x 64 (tf32x3) tiles
    if kernel.startswith("hsda packed"):
        return "HGMMA" if " P=64 " in config else "HMMA"   # P = 16 or 32 rows: too few for a warpgroup
    if not half:
        return "HMMA"          # float32 tiles are 32 x 32 or smaller (tf32x3 triples the operand registers)
    if kernel in ("hsda bwd_dkdv", "hsda bwd_dq") and "HEAD_DIM=128 " in config:
        return "HMMA"          # 32 x 32 backward tiles at d = 128 (larger ones spill)
    return "HGMMA"             # 128 x 64 forward, 64 x 64 / 64 x 32 backward tiles


def test_tensor_core_kind_per_kernel(aot_rows):
    """Every compiled Triton variant's main loop holds the tensor-core instructions it is meant to
    (:func:`_expected`), and the kernels with products hold some in their main loop."""
    run, rows = aot_rows
    rows = [r for r in rows if not r["kernel"].startswith("cuda")]
    assert rows
    wrong = [(r["kernel"], r["config"], r["arch"], r["tensor_cores"]) for r in rows
             if r["tensor_cores"] != _expected(r["kernel"], r["config"] + " ", r["arch"])]
    assert not wrong, wrong[:5]
    for r in rows:
        if r["tensor_cores"] != "none":
            assert (r["loop"] or r["kernel_counts"])["mma"] > 0, r
    fwd = next(r for r in rows if r["kernel"] == "hsda fwd" and r["arch"] == 90 and
               r["config"].startswith("bf16 HEAD_DIM=64 ") and " debug" not in r["config"] + " ")
    # the review read 137 registers, one CTA an SM, ~507 instructions an iteration with the checkerboard
    # arithmetic; the row tables take ~400 at 128-130 registers (Triton 3.6: 128, two CTAs an SM;
    # 3.8: 130, one)
    assert 300 < fwd["loop"]["instr"] < 450 and fwd["regs"] >= 128
    assert fwd["ctas_per_sm"] == (1 if fwd["regs"] > 128 else 2), fwd
    assert fwd["loop"]["mufu"] >= 32 and fwd["loop"]["hgmma"] > 0
