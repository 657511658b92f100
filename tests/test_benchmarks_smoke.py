"""A smoke run of the benchmark harness (tiny shapes, one round): it runs and writes its report."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_benchmark_harness_writes_the_report(tmp_path):
    env = dict(os.environ, VIDKERN_BENCH_QUICK="1", VIDKERN_BENCH_RESULTS=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                          "-k", "(reference or torch or masked or flash) and not compile",
                          "--benchmark-disable-gc"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (md,) = tmp_path.glob("*-quick.md")
    (js,) = tmp_path.glob("*-quick.json")
    assert len(list(tmp_path.glob("*.png"))) == 2
    report = json.loads(js.read_text())
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
