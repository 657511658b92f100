"""The work model's pricing (vidkern.work.machine) and what it reads from the compiled code
(vidkern.work.compiled): each term is its stated rule, the compiled-code terms come from the SASS
of the configuration the launcher runs, and the calibration holds (docs/verify.md)."""
import json
import math

import pytest

from vidkern import work as W
from vidkern.work import Launch, Shape, compiled, report
from vidkern.work import machine as M
from vidkern.work.calibrate import attention_rows, copy_row, matmul_row

H200 = M.H200
VIT_B = Shape(B=32, H=12, N=1568, grid=(8, 14, 14), d=64, D=768, dtype="bf16")


def test_memory_terms_and_waves_are_the_stated_rule():
    m = H200
    one_us = int(m.hbm * 1e-6)
    t = Launch("aten.copy", 132, one_us).price(m)          # one full wave, no compiled code
    assert t["dram_us"] == pytest.approx(1.0) and t["bound"] == "launch"
    assert t["model_us"] == pytest.approx(1.0 + m.mem_latency_s * 1e6 + m.launch_s * 1e6)
    assert t["l2_us"] == pytest.approx(one_us / m.l2_bw * 1e6)
    # 66 programs use half the machine; 133 take two waves at 133/264 of it
    assert Launch("k", 66, one_us).price(m)["dram_us"] == pytest.approx(2.0)
    assert Launch("k", 133, one_us).price(m)["dram_us"] == pytest.approx(264 / 133)
    big = Launch("aten.copy", 132, 1000 * one_us).price(m)
    assert big["bound"] == "dram" and big["model_us"] > 1000
    assert Launch("k", 0, 10 ** 9, 10 ** 9).price(m)["model_us"] == 0.0


def test_the_l2_rule():
    m = H200
    # re-reads whose working set fits in one L2 partition stay in L2
    fits = Launch("k", 132, 10 ** 9, unique=10 ** 8, working_set=m.l2_reuse).price(m)
    assert fits["dram_bytes"] == 10 ** 8 and fits["l2_bytes"] == 10 ** 9
    # twice the partition: half of the re-reads miss
    spills = Launch("k", 132, 10 ** 9, unique=10 ** 8, working_set=2 * m.l2_reuse).price(m)
    assert spills["dram_bytes"] == pytest.approx(10 ** 8 + 0.5 * 9 * 10 ** 8)
    # no unique bytes given: everything is compulsory
    assert Launch("k", 132, 10 ** 9).price(m)["dram_bytes"] == 10 ** 9


def test_product_rates_by_instruction_kind():
    m = H200
    macs = 10 ** 12
    hgmma = Launch("aten.mm", 132, 0, macs).price(m)             # cuBLAS: wgmma
    assert hgmma["mma_kind"] == "HGMMA" and hgmma["bound"] == "mma"
    assert hgmma["mma_us"] == pytest.approx(macs / (2048 * 132 * m.clock_hz * M.SUSTAINED) * 1e6)
    assert m.mac_rate("HMMA", "bf16") == pytest.approx(m.mac_rate("HGMMA", "bf16") * 2 / 3)
    assert m.mac_rate("HMMA", "tf32") == pytest.approx(m.mac_rate("HMMA", "bf16") / 2)
    x3 = Launch("aten.mm", 132, 0, macs, rate="tf32x3").price(m)["mma_us"]
    assert x3 == pytest.approx(3 * Launch("aten.mm", 132, 0, macs, rate="tf32").price(m)["mma_us"])
    assert m.mac_rate("SIMT", "fp32") == pytest.approx(128 * 132 * m.clock_hz * M.SUSTAINED)


def test_serial_terms():
    m = H200
    steps = Launch("k", 1, 0, steps=101, round_trips=3).price(m)
    assert steps["latency_us"] == pytest.approx((1 + 100 * 3) * m.mem_latency_s * 1e6)
    assert steps["bound"] == "latency"
    lib = Launch("sdpa.flash_fwd[x]", 10, 10 ** 6, published_us=123.0).price(m)
    assert lib["model_us"] == pytest.approx(123.0 + m.launch_s * 1e6) and lib["bound"] == "published"


def test_issue_rate_grows_with_resident_warps_to_the_peak():
    m = H200
    peak = 4 * m.clock_hz * m.sustained
    assert M.issue_rate(4, m) == pytest.approx(peak / 2)        # one warp a scheduler: half
    assert M.issue_rate(8, m) == pytest.approx(peak)
    assert M.issue_rate(64, m) == pytest.approx(peak)


def test_the_table_holds_every_configuration_the_reference_shapes_launch():
    """Every Triton and CUDA launch at every reference shape finds its compiled configuration (no
    silent fallback to the memory-only price). The table is compiled with one Triton release; an
    older one runs its own launch tables (``kernels.launch.for_triton``: e.g. Triton 3.6's dX/dE
    merge pass on 8 warps where 3.8's takes 16), which that table does not hold."""
    import triton
    made_with = compiled.table()["triton"]
    if triton.__version__ != made_with:
        pytest.skip(f"vidkern/work/sass_sm90.json holds Triton {made_with}'s configurations; Triton "
                    f"{triton.__version__} launches some of its own (kernels.launch.for_triton)")
    for row in report.reference_rows():
        for r in row["launches"]:
            library = r["kernel"].startswith(("aten.", "sdpa."))
            assert library or r["compiled"], (row["case"], row["backend"], r["kernel"], r["config"])
            if r["compiled"]:
                assert r["issue_us"] > 0, r


def test_compiled_terms_read_the_sass_of_the_launched_configuration():
    """hsda's forward at ViT-B: the sm_90 d=64 entry (HGMMA); its main-loop iterations, derived from
    the counted MACs, are the formula's key tiles per program; MUFU and issue are the SASS's counts
    times them."""
    (launch,) = [l for l in W.launches("hsda", "forward", "triton", VIT_B)]
    launch.dtype = "bf16"
    entry = compiled.lookup(launch)
    assert entry["constexprs"]["HEAD_DIM"] == 64 and entry["tensor_cores"] == "HGMMA"
    assert entry["warps"] == launch.config["num_warps"] and entry["constexprs"]["BLOCK_M"] == launch.config["BLOCK_M"]
    # (query tile, key tile) pairs: 6 global heads over 1568 tokens, 6 sparse heads x 2 groups of 784
    pairs = 6 * math.ceil(1568 / 128) * math.ceil(1568 / 64) + 6 * 2 * math.ceil(784 / 128) * math.ceil(784 / 64)
    assert compiled.iterations(entry, launch) * launch.programs == pytest.approx(VIT_B.B * pairs)
    per = compiled.dynamic(entry, launch)
    it = compiled.iterations(entry, launch)
    assert per["mufu"] == pytest.approx(it * entry["loop"]["mufu"] + entry["kernel"]["mufu"] - entry["loop"]["mufu"])
    t = launch.price(H200)
    resident = min(entry["ctas_per_sm"], math.ceil(launch.programs / 132)) * entry["warps"]
    f = M.busy(launch.programs, H200)
    assert t["issue_us"] == pytest.approx(per["instr"] * entry["warps"] * launch.programs
                                          / (M.issue_rate(resident, H200) * 132 * f) * 1e6)
    assert t["mufu_us"] == pytest.approx(per["mufu"] * entry["warps"] * launch.programs * 2
                                         / (H200.clock_hz * H200.sustained * 132 * f) * 1e6)
    # the wrong configuration is not taken: another head dim has another entry
    other = Launch(launch.kernel, 1, 1, config=dict(launch.config, HEAD_DIM=128), dtype="bf16")
    assert compiled.lookup(other)["constexprs"]["HEAD_DIM"] == 128
    assert compiled.lookup(Launch(launch.kernel, 1, 1, config=dict(launch.config, num_warps=3), dtype="bf16")) is None


def test_hsda_forward_dram_is_its_compulsory_traffic():
    """The issue's reading: 1.7 GB issued (1.73 with the row tables' PERM loads), about 0.31 GB from
    DRAM (K and V re-reads hit L2)."""
    tot = W.total("hsda", "forward", "triton", VIT_B)
    assert tot["bytes"] == pytest.approx(1.726e9, rel=0.01)
    assert tot["dram_bytes"] == pytest.approx(tot["min_bytes"], rel=0.01)
    assert tot["dram_bytes"] == pytest.approx(0.311e9, rel=0.01)


def test_calibration_never_faster_than_the_best_published():
    """No modelled attention beats FA3 for the same work (H100, FA3 paper's setup); no
    memory-bound price beats a measured copy; the matmul is not faster than cuBLAS."""
    rows = attention_rows()
    assert len(rows) == 20
    for r in rows:
        assert r["model"] <= r["fa3"], r
    assert copy_row()["model"] <= copy_row()["published"]
    assert matmul_row()["model"] <= matmul_row()["published"]
    for row in report.reference_rows():
        for r in row["launches"]:
            if r["model_us"]:
                assert r["dram_bytes"] / (r["model_us"] * 1e-6) <= H200.hbm * 1.0001, r


def test_a_softmax_between_products_runs_in_series_with_them():
    """Attention's main loop (tensor-core products and exponentials) is priced products plus the
    longer of its MUFU and issue time; a loop with products but no exponentials (the Gram) is not."""
    (fwd,) = W.launches("hsda", "forward", "triton", VIT_B)
    t = fwd.price(H200)
    assert t["mma_us"] > 0 and t["mufu_us"] > 0
    assert t["serial_us"] == pytest.approx(t["mma_us"] + max(t["mufu_us"], t["issue_us"]))
    assert t["bound"] == "serial" and t["model_us"] > t["serial_us"]
    gram = next(l for l in W.launches("orthogonal_select", "forward", "triton",
                                      Shape(B=32, L=784, N=784, num_out=392, D=768, dtype="bf16"))
                if l.kernel == "_gram_kernel")
    g = gram.price(H200)
    assert g["mma_us"] > 0 and g["serial_us"] == 0.0


def test_reference_prints_model_bound_and_share():
    rows = report.reference_rows()
    text = report.markdown(rows)
    assert "| model us | bound | limit us | share of limit |" in text
    for r in rows:
        assert r["bound"] in tuple(t[:-3] for t in M.TERMS) + ("published",), r
        assert 0 < r["share"] <= 1.0, (r["case"], r["backend"], r["share"])


def test_cli_json_has_every_term(capsys):
    from vidkern.work.__main__ import main
    assert main(["hsda", "B=2", "grid=8,14,14", "--direction", "forward", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    for r in recs:
        assert set(M.TERMS) | {"dram_bytes", "l2_bytes", "model_us", "bound"} <= set(r)
    assert main(["--calibrate"]) == 0
    assert "model / FA3" in capsys.readouterr().out


def test_simt_products_are_priced_at_the_fma_loop():
    """The CUDA merge kernels do their products on the FMA units: a launch with products takes the
    kernel's FMA loop as its main loop, one without (TEAM's gate) the loop that moves the bytes."""
    shape = Shape(B=32, L=784, N=784, num_out=392, D=768)
    (lse, fwd) = W.launches("soft_merge", "forward", "cuda", shape)
    for launch in (lse, fwd):
        launch.dtype = "bf16"
        entry = compiled.lookup(launch)
        assert entry["tensor_cores"] == "none" and entry["fma_loop"]["ffma"] > 0
        assert compiled._loops(entry, launch)[0] is entry["fma_loop"]
        per_iteration = entry["fma_loop"]["ffma"] * 32 * entry["warps"]
        assert compiled.iterations(entry, launch) == pytest.approx(launch.macs / launch.programs / per_iteration)
    gate = [l for l in W.launches("team_gate", "forward", "cuda", VIT_B) if l.kernel == "gate_apply"][0]
    gate.dtype = "bf16"
    entry = compiled.lookup(gate)
    assert compiled._loops(entry, gate)[0] is entry["loop"] and entry["loop"]["gbytes"] > 0


def test_dispatch_puts_first_the_backend_the_model_prices_faster():
    """Of the GPU backends with a model (triton, cuda), automatic dispatch (``dispatch.order``:
    priority and ``PREFERENCES``) tries first the one the model prices faster forward plus backward,
    at every reference shape of every op (``select_meta_tokens`` counts for ``orthogonal_select``,
    which it runs)."""
    from vidkern import dispatch
    rows = report.reference_rows(backends=("triton", "cuda"))
    totals = {}
    for r in rows:
        op = "orthogonal_select" if r["op"] == "select_meta_tokens" else r["op"]
        key = (op, r["op"], r["case"])
        totals.setdefault(key, {}).setdefault(r["backend"], 0.0)
        totals[key][r["backend"]] += r["model_us"]
    assert {k[0] for k in totals} >= {"feature_summary", "team_gate", "orthogonal_select", "soft_merge"}
    for (op, shown, case), us in totals.items():
        first = next(n for n in dispatch.order(op) if n in us)
        assert us[first] == min(us.values()), (op, shown, case, us, dispatch.order(op))
