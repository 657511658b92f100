"""Benchmark harness on pytest-benchmark: providers per op, latency, TFLOP/s, GB/s, peak memory,
and a report in ``benchmarks/results/<device>-<date>.{json,md}`` written at the end of the run.

Each benchmark records ``extra_info`` with ``flops`` (multiply-add = 2 FLOPs, attended pairs
only), ``bytes`` (minimum traffic: inputs read once, outputs written once), ``peak_mem`` and a
``case`` key; the report divides by the median latency and compares providers of one case
against the ``reference`` provider of the same case in the same run.
"""
import datetime
import json
import pathlib
import platform
import resource
import time

import pytest
import torch

RESULTS = pathlib.Path(__file__).parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{torch.get_num_threads()}threads"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def saved_for_backward_mib(fn) -> float:
    """Bytes of distinct tensors autograd saves for the backward during one call of ``fn``:
    the activation memory a training step holds (on CPU the peak allocator figure is unavailable)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


@pytest.fixture
def measure(benchmark):
    """``measure(fn, case=..., provider=..., flops=..., bytes=...)``: time ``fn`` and record its metadata."""

    def run(fn, *, case, provider, flops, nbytes, budget_s=1.0):
        saved = saved_for_backward_mib(fn)  # also the warm-up call
        start = time.perf_counter()
        fn()
        rounds = max(5, min(50, int(budget_s / max(time.perf_counter() - start, 1e-6))))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        benchmark.extra_info.update(case=case, provider=provider, flops=flops, bytes=nbytes, saved_mib=saved)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        benchmark.extra_info["peak_mem_mib"] = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                                                else peak_rss_mib())
    return run


def _rows(session):
    bs = getattr(session.config, "_benchmarksession", None)
    rows = []
    for b in (bs.benchmarks if bs else []):
        info, median = b.extra_info, b.stats.median
        rows.append(dict(name=b.name, case=info.get("case"), provider=info.get("provider"),
                         median_ms=median * 1e3, iqr_ms=b.stats.iqr * 1e3,
                         tflops=info.get("flops", 0) / median / 1e12, gbps=info.get("bytes", 0) / median / 1e9,
                         peak_mem_mib=info.get("peak_mem_mib"), saved_mib=info.get("saved_mib")))
    for r in rows:
        ref = next((x for x in rows if x["case"] == r["case"] and x["provider"] == "reference"), None)
        r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"] if ref else None
    return rows


def pytest_sessionfinish(session, exitstatus):
    rows = _rows(session)
    if not rows:
        return
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{device_name()}-{datetime.date.today().isoformat()}"
    meta = dict(device=device_name(), torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), cuda=torch.cuda.is_available())
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    lines = [f"# vidkern benchmarks — {meta['device']}, torch {meta['torch']}, {datetime.date.today()}", "",
             "CPU runs time the CPU paths only (peak memory is the process's max RSS, so it only grows; 'saved for bwd' is the activation memory autograd keeps from one forward). FLOPs count one "
             "multiply-add as 2 over attended pairs only; GB/s counts inputs read once and outputs written once.", "",
             "| case | provider | median ms | IQR ms | TFLOP/s | GB/s | peak MiB | saved for bwd MiB | x reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup_vs_reference']:.2f}" if r["speedup_vs_reference"] else "-"
        lines.append(f"| {r['case']} | {r['provider']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['tflops']:.4f} | "
                     f"{r['gbps']:.2f} | {r['peak_mem_mib']:.0f} | {r['saved_mib']:.1f} | {sp} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nbenchmark report: {stem.with_suffix('.md')}")
