"""A smoke run of the benchmark harness (tiny shapes, one round): it runs and writes its report."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def test_benchmark_harness_writes_the_report(tmp_path):
    env = dict(os.environ, VIDKERN_BENCH_QUICK="1", VIDKERN_BENCH_RESULTS=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                          "-k", "(reference or torch or masked or flash or global_sdpa) and not compile",
                          "--benchmark-disable-gc"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (md,) = tmp_path.glob("*-quick.md")
    (js,) = tmp_path.glob("*-quick.json")
    report = json.loads(js.read_text())
    ops = {r["case"].split()[0] for r in report["results"]}
    assert {p.name.rsplit("-", 1)[1] for p in tmp_path.glob("*.png")} == {f"{op}.png" for op in ops}
    # the providers of a case ran back to back, the anchors first (reference, then global_sdpa)
    order = [(r["case"], r["provider"]) for r in report["results"]]
    cases = [c for c, _ in order]
    for case in set(cases):
        first, last = cases.index(case), len(cases) - 1 - cases[::-1].index(case)
        assert cases[first:last + 1] == [case] * (last - first + 1), f"{case}'s providers were not run together"
        providers = [p for c, p in order if c == case]
        assert providers[0] == "reference", (case, providers)
        if "global_sdpa" in providers:
            assert providers[1] == "global_sdpa", (case, providers)
    # one round each (QUICK): every ratio but a provider's own is flagged as noise
    for r in report["results"]:
        if r["provider"] != "reference":
            assert r["x_reference_spread"] == float("inf"), r
    providers = {r["provider"] for r in report["results"]}
    assert {"reference", "torch", "masked_sdpa"} <= providers
    assert {"flash_attn"} <= set(report["meta"]["skipped"])            # skipped with a reason, not silently
    for r in report["results"]:
        assert r["median_ms"] > 0 and r["rounds"] >= 1
        assert r["x_reference"] is not None, f"{r['case']} has no reference provider"
    text = md.read_text()
    for needle in ("## attention hsda", "## team", "## soft_merge", "## select", "## model videomae_s",
                   "## Skipped providers", "| videomae_s | 56.88 | 21.95 |", "roofline %",
                   "## Work model at the reference shapes", "| hsda | ViT-B B=32 checkerboard 6+6 | for | triton |",
                   "measured/model"):
        assert needle in text, needle


def _harness():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "benchmarks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_ratios_come_from_paired_rounds_and_flag_their_spread():
    h = _harness()
    row = lambda p, med, iqr, rounds=7: dict(case="c", provider=p, median_ms=med, iqr_ms=iqr, rounds=rounds)
    ref, fast = row("reference", 100.0, 40.0), row("fast", 80.0, 30.0)
    # paired: the per-round ratios are steady although both medians are noisy
    quiet = {("c", "fast"): {"reference": [0.80, 0.81, 0.79, 0.80, 0.82]}}
    value, spread = h._ratio(fast, ref, quiet, invert=True)
    assert value == pytest.approx(1 / 0.80, rel=1e-9) and spread < h.NOISY
    assert h._fmt_ratio(value, spread) == "1.25"
    noisy = {("c", "fast"): {"reference": [0.5, 1.4, 0.8, 2.6, 0.7]}}
    value, spread = h._ratio(fast, ref, noisy, invert=True)
    assert spread > h.NOISY and h._fmt_ratio(value, spread).endswith(" ?")
    # unpaired: the medians' ratio, the two relative IQRs summed
    value, spread = h._ratio(fast, ref, {})
    assert value == pytest.approx(0.8) and spread == pytest.approx(0.4 + 0.375)
    # the anchor paired with the provider the other way round counts too
    value, _ = h._ratio(fast, ref, {("c", "reference"): {"fast": [1.25] * 5}})
    assert value == pytest.approx(0.8)
    assert h._ratio(ref, ref, {}) == (1.0, 0.0) and h._ratio(fast, None, {}) == (None, None)
    assert h._ratio(row("a", 1, 0, rounds=2), row("b", 1, 0), {})[1] == float("inf")
