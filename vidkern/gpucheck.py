"""``python -m vidkern.gpucheck --out DIR`` (``make gpu-check OUT=DIR``): the first GPU contact in one command.

Made for a GPU machine that is not ours: preinstalled torch/triton/nvcc, no network, no virtualenv
created, a few minutes of time. It runs, most important first, and within ``--budget-s``:

1. ``environment`` — versions, the device, its arch and SM count;
2. ``build`` — ``vidkern._C`` for the local GPU's arch only, with every core
   (``pip install --no-deps --no-build-isolation -e .``);
3. ``selftest`` — ``python -m vidkern.selftest`` on the device (every backend against the reference);
4. ``kernel-tests`` — every kernel test file and the GPU-only tests, on the device (the first bf16
   Triton numbers ever checked);
5. ``sanitizer`` — the CUDA kernels under compute-sanitizer memcheck, racecheck and synccheck at
   small shapes (the selftest's ``cuda`` cases);
6. ``benchmarks`` — ``pytest benchmarks/`` reduced to fit, then the fastest backend per op, shape
   and dtype;
7. ``aot`` — ``python -m vidkern.aot`` (registers and spills of every Triton configuration).

Steps that do not fit the budget are dropped, least important first, and the report says which.
DIR receives at most 8 files (names of letters, digits, ``.``, ``_``, ``-``; each under 16 MiB):
``report.md``, ``report.json``, ``tests.txt``, ``sanitizer.log``, ``build.log``, ``bench.json`` and
the benchmark plots. A one-screen summary is printed at the end.

``--dry-run`` runs everything that needs no device on a CPU machine — the environment, the selftest
on CPU, the kernel-test selection (collected, not run), report writing and the file limits — so
the command cannot rot between GPU loans (CI runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2 ** 20
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")

#: The kernel tests run on the device (each skips what the device cannot run, with a reason).
KERNEL_TESTS = ["tests/test_backends.py", "tests/test_triton_hsda.py", "tests/test_triton_team.py",
                "tests/test_triton_backend.py", "tests/test_sttm_kernels.py", "tests/test_cuda_team.py", "tests/test_gpu.py", "tests/test_scale.py",
                "tests/test_host_sync.py"]
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")


@dataclasses.dataclass
class Step:
    name: str
    estimate_s: float      # on one H100/H200 with 16 cores; used to fit the budget
    needs_device: bool
    run: Callable
    status: str = "not run"
    detail: str = ""
    seconds: float = 0.0


class Output:
    """The files of DIR, within the limits: at most ``MAX_FILES``, plain names, each under 16 MiB
    (a log over the limit keeps its end, where the verdict is)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.files: dict = {}
        path.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, data) -> Optional[str]:
        if not NAME_OK.match(name):
            raise ValueError(f"output file name {name!r} must use only letters, digits, '.', '_', '-'")
        if name not in self.files and len(self.files) >= MAX_FILES:
            return None    # the report lists it as left out
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if len(raw) > MAX_FILE_BYTES:
            note = b"[... truncated to the last 16 MiB ...]\n"
            raw = note + raw[-(MAX_FILE_BYTES - len(note)):]
        (self.path / name).write_bytes(raw)
        self.files[name] = len(raw)
        return name


def _run(cmd: list, timeout: float, env: Optional[dict] = None, cwd=ROOT) -> tuple:
    """``(returncode or 'timeout', combined output)`` of ``cmd``."""
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        return "timeout", out.decode(errors="replace") if isinstance(out, bytes) else out


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class GpuCheck:
    def __init__(self, out: pathlib.Path, budget_s: float, dry_run: bool, python: str = sys.executable):
        self.out = Output(out)
        self.budget_s = budget_s
        self.dry_run = dry_run
        self.python = python
        self.t0 = time.monotonic()
        self.facts: dict = {}
        self.logs: dict = {}
        self.fastest: list = []
        self.steps = [
            Step("environment", 5, False, self.environment),
            Step("build", 150, True, self.build),
            Step("selftest", 40, False, self.selftest),
            Step("kernel-tests", 150, False, self.kernel_tests),
            Step("sanitizer", 60, True, self.sanitizer),
            Step("benchmarks", 90, True, self.benchmarks),
            Step("aot", 60, True, self.aot),
        ]

    # ------------------------------------------------------------------ helpers
    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if not self.dry_run:
            env.pop("TRITON_INTERPRET", None)      # on the device the kernels must really run
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def log(self, name: str, text: str) -> None:
        self.logs[name] = self.logs.get(name, "") + text

    # ------------------------------------------------------------------ steps
    def environment(self, timeout):
        import platform

        import torch
        facts = dict(python=platform.python_version(), torch=torch.__version__, cuda_build=torch.version.cuda,
                     cores=os.cpu_count(), cuda_available=torch.cuda.is_available())
        try:
            import triton
            facts["triton"] = triton.__version__
        except Exception as exc:     # reported, not fatal: the report says what is missing
            facts["triton"] = f"not importable: {exc}"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            facts.update(device=props.name, arch=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                         memory_gib=round(props.total_memory / 2 ** 30, 1))
        for tool in ("nvcc", "compute-sanitizer", "ncu"):
            facts[tool] = shutil.which(tool) or "not found"
        self.facts = facts
        return "ok", ", ".join(f"{k} {v}" for k, v in facts.items() if k in ("device", "arch", "torch", "triton"))

    def build(self, timeout):
        import torch
        major, minor = torch.cuda.get_device_capability(0)
        env = self.env(VIDKERN_CUDA_ARCHS=f"{major}{minor}", MAX_JOBS=os.cpu_count() or 4, VIDKERN_FORCE_BUILD=1)
        rc, text = _run([self.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."],
                        timeout, env)
        self.log("build.log", text)
        return ("ok" if rc == 0 else "failed"), f"sm_{major}{minor}, {env['MAX_JOBS']} jobs; rc {rc}"

    def selftest(self, timeout):
        args = ["--device", "cpu"] if self.dry_run else []
        rc, text = _run([self.python, "-m", "vidkern.selftest", *args], timeout, self.env())
        self.log("tests.txt", "$ python -m vidkern.selftest\n" + text + "\n")
        self.facts["selftest"] = text.strip().splitlines()
        return ("ok" if rc == 0 else "failed"), _tail(text, 4).replace("\n", "; ")

    def kernel_tests(self, timeout):
        files = [f for f in KERNEL_TESTS if (ROOT / f).exists()]
        cmd = [self.python, "-m", "pytest", *files, "-q", "-ra", "-p", "no:cacheprovider", "-m", "not slow"]
        if self.dry_run:
            cmd.append("--collect-only")
        rc, text = _run(cmd, timeout, self.env())
        self.log("tests.txt", "$ " + " ".join(cmd[2:]) + "\n" + text + "\n")
        return ("ok" if rc == 0 else "failed"), _tail(text, 1)

    def sanitizer(self, timeout):
        tool = shutil.which("compute-sanitizer")
        if tool is None:
            return "skipped", "compute-sanitizer not found"
        verdicts = []
        for i, kind in enumerate(SANITIZER_TOOLS):
            share = self.left() / (len(SANITIZER_TOOLS) - i)
            cmd = [tool, f"--tool={kind}", "--error-exitcode=9", self.python, "-m", "vidkern.selftest",
                   "--backend", "cuda", "--device", "cuda"]
            rc, text = _run(cmd, min(timeout, share), self.env())
            self.log("sanitizer.log", f"$ {' '.join(cmd)}\n{text}\n")
            verdicts.append(f"{kind} {'clean' if rc == 0 else 'ERRORS' if rc == 9 else rc}")
        return ("ok" if all(v.endswith("clean") for v in verdicts) else "failed"), ", ".join(verdicts)

    def benchmarks(self, timeout):
        results = self.out.path / "_bench"
        env = self.env(VIDKERN_BENCH_RESULTS=results)
        cmd = [self.python, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
               "--benchmark-max-time=0.05", "--benchmark-min-rounds=3", "--benchmark-disable-gc"]
        rc, text = _run(cmd, timeout, env)
        self.log("tests.txt", "$ " + " ".join(cmd[2:]) + "\n" + _tail(text, 40) + "\n")
        found = sorted(results.glob("*.json")) if results.exists() else []
        if found:
            data = json.loads(found[-1].read_text())
            self.fastest = fastest_per_case(data.get("results", []))
            self.out.write("bench.json", found[-1].read_bytes())
            for png in sorted(results.glob("*.png"))[:2]:
                self.out.write("bench-" + png.name.rsplit("-", 1)[-1], png.read_bytes())
        shutil.rmtree(results, ignore_errors=True)
        return ("ok" if rc == 0 and found else "failed"), f"{len(self.fastest)} (case, mode) rows; rc {rc}"

    def aot(self, timeout):
        rc, text = _run([self.python, "-m", "vidkern.aot"], timeout, self.env())
        self.log("tests.txt", "$ python -m vidkern.aot\n" + _tail(text, 60) + "\n")
        return ("ok" if rc == 0 else "failed"), _tail(text, 1)

    # ------------------------------------------------------------------ plan, run, report
    def plan(self) -> tuple:
        """``(steps to run, steps dropped)``: the most important steps whose estimates fit the
        budget; from the first that does not fit, every less important step is dropped too."""
        run, dropped, used = [], [], 0.0
        for step in self.steps:
            if self.dry_run and step.needs_device:
                step.status, step.detail = "skipped", "dry run: needs the device"
                continue
            if not dropped and (used + step.estimate_s <= self.budget_s or not run):
                run.append(step)
                used += step.estimate_s
            else:
                step.status, step.detail = "dropped", f"budget: needs ~{step.estimate_s:.0f} s, {self.budget_s - used:.0f} s left"
                dropped.append(step)
        return run, dropped

    def run(self) -> int:
        run, _ = self.plan()
        for i, step in enumerate(run):
            if step.status != "not run":      # skipped by an earlier step's outcome
                continue
            # Leave the later steps at least half their estimates; the last step gets what is left.
            later = sum(s.estimate_s for s in run[i + 1:])
            timeout = max(self.left() - later * 0.5, step.estimate_s * 0.5) if i + 1 < len(run) else self.left()
            if self.left() < 5:
                step.status, step.detail = "dropped", "budget spent by the earlier steps"
                continue
            t = time.monotonic()
            try:
                step.status, step.detail = step.run(min(timeout, self.left()))
            except Exception as exc:    # one broken step must not lose the report of the others
                step.status, step.detail = "failed", f"{type(exc).__name__}: {exc}"
            step.seconds = time.monotonic() - t
            print(f"[gpucheck] {step.name}: {step.status} ({step.seconds:.0f} s) {step.detail}", flush=True)
            if step.name == "build" and step.status != "ok":
                for s in run[i + 1:]:
                    if s.name == "sanitizer":
                        s.status, s.detail = "skipped", "the CUDA extension did not build (build.log)"
        self.write_report()
        print(self.summary())
        return 0 if all(s.status in ("ok", "skipped", "dropped") for s in self.steps) else 1

    def write_report(self) -> None:
        for name in ("build.log", "sanitizer.log", "tests.txt"):
            if name in self.logs:
                self.out.write(name, self.logs[name])
        record = dict(dry_run=self.dry_run, budget_s=self.budget_s, facts=self.facts,
                      steps=[dataclasses.asdict(s) | {"run": None} for s in self.steps], fastest=self.fastest)
        lines = [f"# vidkern gpu-check{' (dry run)' if self.dry_run else ''}", "",
                 ", ".join(f"{k}: {v}" for k, v in self.facts.items() if k != "selftest"), "",
                 "| step | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail.replace('|', '/')} |" for s in self.steps]
        if self.facts.get("selftest"):
            lines += ["", "## selftest", "", "```", *self.facts["selftest"], "```"]
        if self.fastest:
            lines += ["", "## Fastest provider per case and mode", "", "| case | mode | fastest | ms | runner-up | ms |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {f['case']} | {f['mode']} | {f['fastest']} | {f['ms']:.3f} | {f['runner_up'] or '-'} | "
                      f"{f['runner_up_ms'] if f['runner_up_ms'] is None else round(f['runner_up_ms'], 3)} |"
                      for f in self.fastest]
        # report.md and report.json are written last, so they can list every file.
        reserved = 2 - sum(n in self.out.files for n in ("report.md", "report.json"))
        while len(self.out.files) > MAX_FILES - reserved:
            victim = sorted(n for n in self.out.files if n.endswith(".png"))[-1:]   # plots go first
            if not victim:
                break
            (self.out.path / victim[0]).unlink()
            del self.out.files[victim[0]]
        record["files"] = sorted(set(self.out.files) | {"report.md", "report.json"})
        lines += ["", "Files: " + ", ".join(record["files"]), ""]
        self.out.write("report.json", json.dumps(record, indent=1, default=str))
        self.out.write("report.md", "\n".join(lines))

    def summary(self) -> str:
        width = max(len(s.name) for s in self.steps)
        lines = [f"vidkern gpu-check{' --dry-run' if self.dry_run else ''}: {self.facts.get('device', 'no device')}, "
                 f"torch {self.facts.get('torch')}, triton {self.facts.get('triton')}"]
        lines += [f"  {s.name:<{width}}  {s.status:<8} {s.seconds:5.0f} s  {s.detail[:100]}" for s in self.steps]
        lines += [f"  fastest: {f['case']} {f['mode']}: {f['fastest']}" for f in self.fastest[:8]]
        lines.append(f"  report: {self.out.path / 'report.md'} ({len(self.out.files)} files)")
        return "\n".join(lines)


def fastest_per_case(rows: list) -> list:
    """For each (case, mode): the provider with the lowest median, and the runner-up. The case
    names carry op, shape and dtype, so this answers "which backend is fastest per op, shape, dtype"."""
    out = []
    keys = dict.fromkeys((r["case"], r["mode"]) for r in rows)
    for case, mode in keys:
        ranked = sorted((r for r in rows if r["case"] == case and r["mode"] == mode), key=lambda r: r["median_ms"])
        out.append(dict(case=case, mode=mode, fastest=ranked[0]["provider"], ms=ranked[0]["median_ms"],
                        runner_up=ranked[1]["provider"] if len(ranked) > 1 else None,
                        runner_up_ms=ranked[1]["median_ms"] if len(ranked) > 1 else None))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidkern.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder for the report (at most 8 files)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget in seconds (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="run only what needs no device (CI)")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            parser.error("no CUDA device here; use --dry-run on a machine without a GPU")
    return GpuCheck(args.out, args.budget_s, args.dry_run).run()


if __name__ == "__main__":
    sys.exit(main())
