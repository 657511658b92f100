"""Benchmark harness on pytest-benchmark.

Every benchmark is one (case, provider, mode) cell. The providers of one case run back to back
(``pytest_collection_modifyitems``), and every round of a provider is paired with a round of each
*anchor* of its case run just before it (:data:`ANCHORS`: the reference, dense SDPA), so the ratio
columns are medians of per-round ratios: load that comes and goes during a case moves both sides
of a ratio alike, and a ratio whose per-round spread is still wide is flagged (:data:`NOISY`).
``measure`` times a cell and records FLOPs
(2 per multiply-add, attended pairs only), bytes (minimum traffic: inputs read once, outputs
written once), memory, and the case key. At the end of the session the harness writes
``benchmarks/results/<device>-<date>.json``, a markdown report and PNG plots: latency with
spread, TFLOP/s, GB/s, share of the device's roofline, memory, the ratio to the ``reference``
provider of the same case in the same run, the FLOP/parameter table of every model preset,
and every skipped provider with its reason.

Environment: ``VIDKERN_BENCH_QUICK=1`` shrinks every shape and round count (the test suite's
smoke run); ``VIDKERN_BENCH_RESULTS`` redirects the report; ``VIDKERN_BENCH_INTERPRET=1``
runs the ``triton`` provider on CPU in Triton's interpreter (slow; the report says so).
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time
import weakref

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(__file__))  # benchmarks/cases.py

QUICK = os.environ.get("VIDKERN_BENCH_QUICK") == "1"
INTERPRET = os.environ.get("VIDKERN_BENCH_INTERPRET") == "1"
if INTERPRET and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported
RESULTS = pathlib.Path(os.environ.get("VIDKERN_BENCH_RESULTS", pathlib.Path(__file__).parent / "results"))
MODES = ("fwd", "bwd", "fwd+bwd")
SKIPPED: dict = {}  # provider -> reason, for the report
MIN_ROUNDS = 1 if QUICK else 5   # a median and an IQR of fewer rounds say little
#: Providers each other provider of the same case is paired with, round by round: ``x ref`` is
#: against ``reference``, ``vs dense`` against ``global_sdpa`` (plain SDPA on every head).
ANCHORS = ("reference", "global_sdpa")
#: A ratio is flagged when its relative spread (the IQR of its per-round ratios over their median;
#: unpaired, the two sides' IQR/median summed) exceeds this: it could be off by more than 10%.
NOISY = 0.10


def _case_params(item) -> tuple:
    spec = getattr(item, "callspec", None)
    params = {k: v for k, v in (spec.params.items() if spec else ()) if k != "provider"}
    return item.module.__name__ if hasattr(item, "module") else "", tuple(sorted((k, str(v)) for k, v in params.items()))


def _anchor_rank(item) -> int:
    spec = getattr(item, "callspec", None)
    provider = spec.params.get("provider") if spec else None
    return ANCHORS.index(provider) if provider in ANCHORS else len(ANCHORS)


def pytest_collection_modifyitems(session, config, items):
    """Run the providers of one case back to back — the anchors first, then the rest in their declared
    order — instead of one provider through every case: a case's cells are seconds apart, not minutes,
    and every non-anchor round can be paired with an anchor round."""
    first = {}
    for i, item in enumerate(items):
        first.setdefault(_case_params(item), i)
    items.sort(key=lambda item: (first[_case_params(item)], _anchor_rank(item)))   # stable otherwise


#: the current case's anchors: case -> {provider: (setup, timed)}, one round each
_ANCHOR_ROUNDS: dict = {}
_PROGRESS = {"done": 0}

# Dense peaks (TFLOP/s for the tensor-core dtype, fp32 without tensor cores; TB/s of HBM).
# Matched in order against the device name (PCIe/NVL variants before the SXM default).
GPU_PEAKS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0, "tbps": 2.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0, "tbps": 3.9}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tbps": 3.35}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tbps": 4.8}),
    ("A100-PCIE-40GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tbps": 1.555}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tbps": 2.0}),
]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{torch.get_num_threads()}threads"


NOTES: dict = {}  # provider -> what it computes, when that differs from the case's op
UNMEASURED: dict = {}  # provider -> which column could not be measured for it, and why


def note_provider(provider: str, note: str) -> None:
    NOTES.setdefault(provider, note)


def skip_provider(provider: str, reason: str):
    """Skip this benchmark, and list the provider and reason in the report."""
    SKIPPED.setdefault(provider, reason)
    pytest.skip(f"{provider}: {reason}")


def _measure_cpu_peaks() -> dict:
    """Measured here, since CPUs have no table: a large fp32 matmul and a large copy."""
    n = 512 if QUICK else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        a @ b
    tflops = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12
    src = torch.empty(2 ** (22 if QUICK else 26), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    tbps = 2 * src.numel() * reps / (time.perf_counter() - t) / 1e12
    return {"fp32": tflops, "bf16": tflops, "fp16": tflops, "tbps": tbps, "source": f"measured ({n}^3 matmul, copy)"}


_PEAKS: dict = {}


def device_peaks() -> dict:
    if not _PEAKS:
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            known = next((v for k, v in GPU_PEAKS if k in name), None)
            _PEAKS.update(dict(known, source="datasheet") if known else {"source": f"unknown GPU {name}"})
        else:
            _PEAKS.update(_measure_cpu_peaks())
    return _PEAKS


def saved_for_backward_mib(fn) -> float:
    """Bytes of distinct tensors autograd saves for the backward during one call of ``fn``: the
    activation memory a training step holds (on CPU the allocator's peak is not available)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the CPU tensors ATen ops allocate while active (freed storages are subtracted
    when torch frees them: storage PyObjects live exactly as long as the storage)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.seen:
                    self.seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_tensor_mib(fn) -> float:
    """CPU: the peak of tensor memory allocated during one call of ``fn`` (its inputs excluded),
    tracked per ATen op; the per-case peak that the process's max RSS (which only grows) cannot give."""
    with _LiveTensorBytes() as probe:
        fn()
    return probe.peak / 2**20


def _grad_inputs(inputs):
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@pytest.fixture
def measure(benchmark):
    """``measure(forward, inputs, case=, provider=, mode=, flops=, nbytes=, dtype=, work=)``.

    ``forward(*inputs)`` returns a tensor or tuple; ``mode`` is ``fwd`` (no grad), ``bwd``
    (backward of a forward run untimed in the setup) or ``fwd+bwd``. ``flops``/``nbytes`` are
    dicts with ``fwd`` and ``bwd`` entries (the forward+backward figure is their sum). ``work``:
    the ``(op, vidkern.work.Shape)`` calls the case makes, so the report puts the work model's
    ``model_us`` (for the ``triton``/``cuda`` providers) beside the measured time.
    """

    def run(forward, inputs, *, case, provider, mode, flops, nbytes, dtype=torch.float32, budget_s=None, work=()):
        budget_s = budget_s or (0.05 if QUICK else 1.0)
        grads = None

        def fwd():
            with torch.no_grad():
                forward(*inputs)

        def fwd_bwd():
            nonlocal grads
            out = _as_tuple(forward(*inputs))
            grads = grads or [torch.randn_like(o) for o in out]
            torch.autograd.grad(out, _grad_inputs(inputs), grads)

        def setup():
            out = _as_tuple(forward(*inputs))
            _sync()  # the timer starts when setup returns: queued forward work must not count as backward
            return (out,), {}

        def bwd(out):
            torch.autograd.grad(out, _grad_inputs(inputs), grads)

        (fwd if mode == "fwd" else fwd_bwd)()  # warm-up (compilation, caches) and the output gradients
        saved = 0.0 if mode == "fwd" else saved_for_backward_mib(lambda: forward(*inputs))
        for stale in [c for c in _ANCHOR_ROUNDS if c != case]:   # the providers of a case run together
            del _ANCHOR_ROUNDS[stale]
        anchors = {p: a for p, a in _ANCHOR_ROUNDS.get(case, {}).items() if p != provider}
        anchor_s = {p: [] for p in anchors}
        start = time.perf_counter()
        (fwd if mode == "fwd" else fwd_bwd)()
        _sync()
        once = time.perf_counter() - start
        start = time.perf_counter()
        _anchor_round(anchors, anchor_s)
        pair_once = once + time.perf_counter() - start
        for times in anchor_s.values():
            times.clear()
        rounds = 1 if QUICK else max(MIN_ROUNDS, min(50, int(budget_s / max(pair_once, 1e-6))))
        total_flops = flops["fwd"] * (mode != "bwd") + flops["bwd"] * (mode != "fwd")
        total_bytes = nbytes["fwd"] * (mode != "bwd") + nbytes["bwd"] * (mode != "fwd")
        benchmark.group = case
        benchmark.extra_info.update(case=case, provider=provider, mode=mode, flops=total_flops, bytes=total_bytes,
                                    saved_mib=saved, dtype=str(dtype).replace("torch.", ""),
                                    **model_us(work, provider, mode))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def timed(fn):
            def call(*args):
                fn(*args)
                _sync()
            return call
        def paired_setup():
            _anchor_round(anchors, anchor_s)   # timed here, just before this provider's round
            return setup() if mode == "bwd" else ((), {})
        if mode == "bwd":
            benchmark.pedantic(timed(bwd), setup=paired_setup, rounds=rounds, iterations=1)
        else:
            benchmark.pedantic(timed(fwd if mode == "fwd" else fwd_bwd), setup=paired_setup, rounds=rounds,
                               iterations=1)
        own = list(benchmark.stats.stats.data)
        benchmark.extra_info["paired"] = {p: [t / a for t, a in zip(own, times)] for p, times in anchor_s.items()
                                          if len(times) == len(own)}
        if provider in ANCHORS:
            _ANCHOR_ROUNDS.setdefault(case, {})[provider] = \
                (setup, timed(bwd)) if mode == "bwd" else (lambda: ((), {}), timed(fwd if mode == "fwd" else fwd_bwd))
        _progress(case, provider, own)
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            try:
                peak = peak_tensor_mib(fwd if mode == "fwd" else fwd_bwd)
            except Exception as exc:   # e.g. a compiled graph that refuses to run under a dispatch mode
                peak = float("nan")
                UNMEASURED.setdefault(provider, f"CPU peak memory (`nan`): {type(exc).__name__} under the "
                                                "tensor-tracking dispatch mode")
        benchmark.extra_info["peak_mem_mib"] = peak
    return run


def _anchor_round(anchors: dict, times: dict) -> None:
    """One round of each anchor (its setup untimed), its time appended to ``times[provider]``."""
    for p, (setup, timed_fn) in anchors.items():
        args, kwargs = setup()
        start = time.perf_counter()
        timed_fn(*args, **kwargs)
        times[p].append(time.perf_counter() - start)


def _progress(case: str, provider: str, own: list) -> None:
    """A line per cell on the terminal (past pytest's capture): long runs show where they are."""
    _PROGRESS["done"] += 1
    med = sorted(own)[len(own) // 2] * 1e3 if own else float("nan")
    print(f"[bench {_PROGRESS['done']}] {case} | {provider}: {med:.3f} ms median of {len(own)}",
          file=sys.__stderr__, flush=True)


def model_us(work, provider: str, mode: str) -> dict:
    """The work model's H200 time of a case's op calls on ``provider``'s kernels, or its hsda SDPA
    strategy's, and the term that bounds it (``model_us`` None when the provider has no model: the
    reference, torch, baselines)."""
    from vidkern import work as W
    none = dict(model_us=None, model_bound=None)
    if not work or provider not in W.PATHS:
        return none
    directions = {"fwd": ("forward",), "bwd": ("backward",), "fwd+bwd": ("forward", "backward")}[mode]
    try:
        totals = [W.total(op, direction, provider, shape) for op, shape in work
                  for direction in directions if W.launches(op, direction, provider, shape)]
    except ValueError:   # an op this backend has no model for
        return none
    by_bound = {}
    for t in totals:
        by_bound[t["bound"]] = by_bound.get(t["bound"], 0.0) + t["model_us"]
    return dict(model_us=sum(t["model_us"] for t in totals),
                model_bound=max(by_bound, key=by_bound.get) if by_bound else None)


def work_shape(**keys):
    """A ``vidkern.work.Shape`` with the benchmark dtype's name."""
    from vidkern.work import Shape
    dtype = keys.pop("dtype", torch.float32)
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return Shape(dtype=name, **keys)


# --------------------------------------------------------------------------- report
def _rows(session) -> list:
    bs = getattr(session.config, "_benchmarksession", None)
    peaks = device_peaks() if bs and bs.benchmarks else {}
    rows = []
    for b in (bs.benchmarks if bs else []):
        info, median = b.extra_info, b.stats.median
        dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(info.get("dtype"), "fp32")
        roofline_s = max(info["flops"] / (peaks.get(dtype, 0) * 1e12 or float("inf")),
                         info["bytes"] / (peaks.get("tbps", 0) * 1e12 or float("inf")))
        rows.append(dict(case=info["case"], provider=info["provider"], mode=info["mode"], dtype=info.get("dtype"),
                         median_ms=median * 1e3, iqr_ms=b.stats.iqr * 1e3, rounds=b.stats.rounds,
                         tflops=info["flops"] / median / 1e12, gbps=info["bytes"] / median / 1e9,
                         roofline_pct=100 * roofline_s / median, saved_mib=info["saved_mib"],
                         peak_mem_mib=info.get("peak_mem_mib", float("nan")), model_us=info.get("model_us"),
                         model_bound=info.get("model_bound")))
    paired = {(b.extra_info["case"], b.extra_info["provider"]): b.extra_info.get("paired", {})
              for b in (bs.benchmarks if bs else [])}
    for r in rows:
        ref = next((x for x in rows if x["case"] == r["case"] and x["provider"] == "reference"), None)
        r["x_reference"], r["x_reference_spread"] = _ratio(r, ref, paired, invert=True)
        dense = [x for x in rows if x["case"] == r["case"] and x["provider"] in DENSE_PROVIDERS]
        fastest = min(dense, key=lambda x: x["median_ms"]) if dense else None
        r["vs_dense"], r["vs_dense_spread"] = _ratio(r, fastest, paired)
    return rows


def _iqr(values: list) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def _ratio(r: dict, anchor, paired: dict, invert: bool = False) -> tuple:
    """``(ratio, relative spread)`` of row ``r`` against the ``anchor`` row (``invert``: anchor over
    ``r``, else ``r`` over anchor): the median of the per-round ratios when the two were paired
    (``measure``), else the ratio of the medians with the two IQR/median summed as its spread;
    fewer than 3 rounds have no spread to speak of (infinite)."""
    if anchor is None:
        return None, None
    if anchor is r:
        return 1.0, 0.0
    per_round = paired.get((r["case"], r["provider"]), {}).get(anchor["provider"])
    if not per_round:   # the anchor ran after this provider (or never): compare the medians
        per_round = [1 / x for x in paired.get((anchor["case"], anchor["provider"]), {}).get(r["provider"], [])]
    if per_round:
        ratios = [1 / x for x in per_round] if invert else per_round
        med = statistics.median(ratios)
        return med, (_iqr(ratios) / med if len(ratios) >= 3 else float("inf"))
    ratio = r["median_ms"] / anchor["median_ms"]
    spread = (r["iqr_ms"] / r["median_ms"] + anchor["iqr_ms"] / anchor["median_ms"]
              if min(r["rounds"], anchor["rounds"]) >= 3 else float("inf"))
    return (1 / ratio if invert else ratio), spread


def _fmt_ratio(value, spread) -> str:
    """A ratio for the tables; ``?`` when its spread exceeds :data:`NOISY` (not meaningful)."""
    if value is None:
        return "-"
    return f"{value:.2f}" + (" ?" if spread is not None and spread > NOISY else "")


#: Dense attention on every head, the cost HSDA must beat (issue 14): the fastest of these in a
#: case is its ``vs dense`` denominator.
DENSE_PROVIDERS = ("global_sdpa", "cudnn_sdpa", "flash_attn", "xformers")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def _baseline_versions() -> dict:
    versions = {}
    for name in ("flash_attn", "xformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:
            versions[name] = f"not importable ({type(exc).__name__})"
    return versions


def _aot_table() -> str:
    """Registers, shared memory and spills of every Triton kernel configuration, sm_80 and sm_90."""
    try:
        from vidkern import aot
        run = aot.run_in_subprocess()
        return run.stdout.strip() + "\n\n" + run.stderr.strip().splitlines()[-1]
    except Exception as exc:  # no toolchain: say so instead of losing the report
        return f"not available: {type(exc).__name__}: {exc}"


def _model_cells(r) -> str:
    if r.get("model_us") is None:
        return "- | -"
    bound = f" ({r['model_bound']})" if r.get("model_bound") else ""
    return f"{r['model_us']:,.1f}{bound} | {r['median_ms'] * 1e3 / r['model_us']:.2f}"


def _work_table() -> str:
    try:
        from vidkern.work import report
        return report.markdown()
    except Exception as exc:   # the timings must be written even if the model fails
        return f"not available: {type(exc).__name__}: {exc}"


def _flop_table() -> list:
    from vidkern import flops, models
    table = []
    for name in models.PRESETS:
        report = flops.count_preset(name)
        table.append(dict(model=name, gmacs=report.gmacs, params_m=report.params / 1e6))
    return table


def _op_and_mode(case: str) -> tuple:
    """``(op, mode, the rest)`` of a case label such as ``attention hsda ViT-S B=1 fwd+bwd``."""
    words = case.split()
    mode = words[-1] if words[-1] in MODES else ""
    return words[0], mode, " ".join(words[1:-1] if mode else words[1:])


def _plots(rows, stem) -> list:
    """One PNG per op: a column per mode, speed-up over the reference on top (log scale; a hatched
    pale bar is a ratio flagged noisy) and the memory saved for the backward below; bars grouped by
    case, one colour per provider throughout."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.patches
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        return [f"plots skipped: matplotlib not importable ({exc})"]
    providers = sorted({r["provider"] for r in rows})
    colour = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(providers)}
    written = []
    for op in dict.fromkeys(_op_and_mode(r["case"])[0] for r in rows):
        mine = [r for r in rows if _op_and_mode(r["case"])[0] == op]
        modes = [m for m in (*MODES, "") if any(_op_and_mode(r["case"])[1] == m for r in mine)]
        cases = list(dict.fromkeys(_op_and_mode(r["case"])[2] for r in mine))
        present = [p for p in providers if any(r["provider"] == p for r in mine)]
        width = 0.8 / max(len(present), 1)
        fig, axes = plt.subplots(2, len(modes), figsize=(max(4.5, 1.1 * len(cases) * max(1, len(present) / 4))
                                                         * len(modes), 6.5), squeeze=False)
        for col, mode in enumerate(modes):
            for row, (metric, label) in enumerate((("x_reference", "speed-up over reference (x)"),
                                                   ("saved_mib", "saved for backward (MiB)"))):
                ax = axes[row][col]
                if metric == "saved_mib" and mode == "fwd":
                    ax.set_axis_off()     # nothing is saved without a backward
                    continue
                for i, p in enumerate(present):
                    for j, c in enumerate(cases):
                        r = next((x for x in mine if x["provider"] == p
                                  and _op_and_mode(x["case"])[1:] == (mode, c)), None)
                        if r is None or not r[metric]:
                            continue
                        noisy = metric == "x_reference" and (r.get("x_reference_spread") or 0) > NOISY
                        base = 1.0 if metric == "x_reference" else 0.0   # speed-ups up, slow-downs down
                        ax.bar(j + i * width, r[metric] - base, width, bottom=base, color=colour[p],
                               alpha=0.35 if noisy else 1.0, hatch="//" if noisy else None)
                ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=30, ha="right",
                              fontsize=7)
                if metric == "x_reference":
                    ax.set_yscale("log")
                    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                    ax.axhline(1.0, color="black", linewidth=0.5)
                    ax.set_title(f"{op} {mode}".strip(), fontsize=9)
                ax.set_ylabel(label, fontsize=8)
        fig.legend(handles=[matplotlib.patches.Patch(color=colour[p], label=p) for p in present], fontsize=7,
                   loc="upper right")
        fig.suptitle(f"vidkern {op} — {device_name()} (hatched: ratio too noisy to read)", fontsize=10)
        fig.tight_layout(rect=(0, 0, 0.9, 0.95))
        path = stem.parent / f"{stem.name}-{op}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written


def pytest_sessionfinish(session, exitstatus):
    rows = _rows(session)
    if not rows:
        return
    import vidkern
    RESULTS.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    stem = RESULTS / f"{device_name()}-{today}{'-quick' if QUICK else ''}"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not importable"
    meta = dict(device=device_name(), date=today, vidkern=vidkern.__version__, torch=torch.__version__,
                triton=triton_version, python=platform.python_version(), threads=torch.get_num_threads(),
                cpu=_cpu_model(), cuda=torch.version.cuda if torch.cuda.is_available() else None,
                baselines=_baseline_versions(), peaks=device_peaks(), quick=QUICK, skipped=dict(SKIPPED),
                provider_notes=dict(NOTES))
    try:
        flop_table = _flop_table()
    except Exception as exc:  # the timings must be written even if the FLOP table cannot be built
        flop_table = []
        meta["flop_table_error"] = f"{type(exc).__name__}: {exc}"
    plots = _plots(rows, stem)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=rows, flops=flop_table), indent=1))
    peaks = meta["peaks"]
    lines = [f"# vidkern benchmarks — {meta['device']}, {today}", "",
             f"vidkern {meta['vidkern']}, torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, "
             f"{meta['threads']} threads{', CUDA ' + meta['cuda'] if meta['cuda'] else ''}; CPU: {meta['cpu']}; "
             + ", ".join(f"{k} {v}" for k, v in meta["baselines"].items()) + ".",
             f"Roofline peaks ({peaks.get('source')}): {peaks.get('fp32', 0):.3f} TFLOP/s fp32, "
             f"{peaks.get('bf16', 0):.3f} TFLOP/s bf16, {peaks.get('tbps', 0) * 1e3:.1f} GB/s.", "",
             "FLOPs: 2 per multiply-add, attended pairs only (global head 4·N²·d forward, sparse-dense head "
             "4·Σ|G|²·d; backward 2.5x forward for attention). GB/s: minimum traffic. Roofline %: the time the "
             "roofline allows over the measured median. `saved MiB`: activation memory autograd keeps from one "
             "forward. `peak MiB`: GPU allocator peak; on CPU the peak of the tensors allocated during one call "
             "(inputs excluded), tracked per ATen op. "
             "`x ref`: the reference provider's time over this one's, same case, same run. "
             "`vs dense`: this provider's time over the fastest dense provider's (attention on every head: "
             + ", ".join(DENSE_PROVIDERS) + ") in the same case and run — below 1 is faster than dense. "
             "Both are medians of per-round ratios where each round of this provider ran right after a round "
             "of the reference and of global_sdpa (else the ratio of the medians); a ratio marked `?` has a "
             f"relative spread over {NOISY:.0%} (IQR of its per-round ratios over their median; unpaired, the "
             "two IQR/median summed): the machine was too noisy for it to mean anything. "
             "`model us`: the work model's H200 time for the triton/cuda kernels and hsda's split/views "
             "strategies (their SDPA calls at FA2's published rate), priced from the compiled sm_90 code, with "
             "the term that bounds it (vidkern.work; a model, not a measurement — on another device it is only a "
             "scale); the work model table at the end gives every op's terms and bound."
             + (" QUICK run: tiny shapes, one round — not a measurement." if QUICK else ""), ""]
    for case in dict.fromkeys(r["case"] for r in rows):
        lines += [f"## {case}", "",
                  "| provider | median ms | IQR ms | rounds | TFLOP/s | GB/s | roofline % | saved MiB | peak MiB | x ref "
                  "| vs dense | model us | measured/model |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["case"] == case):
            ref = _fmt_ratio(r["x_reference"], r.get("x_reference_spread"))
            dense = _fmt_ratio(r.get("vs_dense"), r.get("vs_dense_spread"))
            lines.append(f"| {r['provider']} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {r['rounds']} | "
                         f"{r['tflops']:.4f} | {r['gbps']:.2f} | {r['roofline_pct']:.1f} | {r['saved_mib']:.1f} | "
                         f"{r['peak_mem_mib']:.0f} | {ref} | {dense} | {_model_cells(r)} |")
        lines.append("")
    lines += ["## Providers that compute something else", "",
              "They answer what the case would cost done another way; their 'x ref' compares latency only.", ""]
    lines += [f"- `{p}`: {what}" for p, what in sorted(NOTES.items())] or ["none"]
    if UNMEASURED:
        lines += ["", "## Columns not measured", ""] + [f"- `{p}`: {what}" for p, what in sorted(UNMEASURED.items())]
    lines += ["", "## Skipped providers", ""] + ([f"- `{p}`: {why}" for p, why in sorted(SKIPPED.items())] or ["none"])
    lines += ["", "## Model presets (SPEC §4 convention, 1 clip)", ""]
    if "flop_table_error" in meta:
        lines += [f"FLOP table failed: {meta['flop_table_error']}", ""]
    lines += ["| model | GMACs | params (M) |", "|---|---|---|"]
    lines += [f"| {t['model']} | {t['gmacs']:.2f} | {t['params_m']:.2f} |" for t in flop_table]
    lines += ["", "## Work model at the reference shapes (python -m vidkern.work --reference)", ""]
    lines += [_work_table(), ""]
    lines += ["", "## Triton kernels compiled ahead of time (python -m vidkern.aot)", ""]
    lines += [_aot_table() if not QUICK else "skipped in a QUICK run", ""]
    lines += ["", "Plots: " + ", ".join(plots), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print(f"\nbenchmark report: {stem.with_suffix('.md')}")
