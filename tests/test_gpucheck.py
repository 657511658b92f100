"""``python -m vidkern.gpucheck``: its dry run (what CI can run without a device), its budget plan
and its output limits, so the one-command GPU check cannot rot between GPU loans."""
import json
import pathlib
import subprocess
import sys

import pytest

from vidkern import gpucheck

ROOT = pathlib.Path(__file__).parents[1]


def test_dry_run_writes_a_bounded_report(tmp_path):
    out = tmp_path / "gc"
    run = subprocess.run([sys.executable, "-m", "vidkern.gpucheck", "--dry-run", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert 3 <= len(files) <= gpucheck.MAX_FILES, files
    for f in files:
        assert f.parent == out and gpucheck.NAME_OK.match(f.name) and f.stat().st_size < gpucheck.MAX_FILE_BYTES
    record = json.loads((out / "report.json").read_text())
    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == ["environment", "build", "selftest", "kernel-tests", "sanitizer", "benchmarks", "aot"]
    assert steps["environment"]["status"] == steps["selftest"]["status"] == steps["kernel-tests"]["status"] == "ok"
    for name in ("build", "sanitizer", "benchmarks", "aot"):
        assert steps[name]["status"] == "skipped" and "dry run" in steps[name]["detail"]
    assert "tests collected" in steps["kernel-tests"]["detail"] and not steps["kernel-tests"]["detail"].startswith("0")
    assert sorted(record["files"]) == sorted(f.name for f in files)
    assert any(line.startswith("torch ") and " ok " in line for line in record["facts"]["selftest"])
    text = (out / "report.md").read_text()
    assert "| kernel-tests | ok |" in text and "Files: " in text
    assert "vidkern gpu-check --dry-run" in run.stdout and len(run.stdout.splitlines()) < 40   # one screen


def test_budget_drops_the_least_important_steps_first(tmp_path):
    check = gpucheck.GpuCheck(tmp_path, budget_s=300, dry_run=False)
    run, dropped = check.plan()
    names = [s.name for s in check.steps]
    assert [s.name for s in run] == names[:len(run)], "kept steps must be the most important ones"
    assert dropped and [s.name for s in dropped] == names[len(run):]
    assert sum(s.estimate_s for s in run) <= 300
    assert all(s.status == "dropped" and "budget" in s.detail for s in dropped)
    full, none_dropped = gpucheck.GpuCheck(tmp_path, budget_s=10_000, dry_run=False).plan()
    assert len(full) == len(names) and not none_dropped


def test_output_limits(tmp_path):
    out = gpucheck.Output(tmp_path)
    with pytest.raises(ValueError, match="must use only letters"):
        out.write("bad name.txt", "x")
    with pytest.raises(ValueError, match="must use only letters"):
        out.write("sub/dir.txt", "x")
    for i in range(gpucheck.MAX_FILES):
        assert out.write(f"f{i}.txt", "x") == f"f{i}.txt"
    assert out.write("one-too-many.txt", "x") is None and not (tmp_path / "one-too-many.txt").exists()
    big = "a" * (gpucheck.MAX_FILE_BYTES + 100) + "THE END"
    out.write("f0.txt", big)
    data = (tmp_path / "f0.txt").read_bytes()
    assert len(data) <= gpucheck.MAX_FILE_BYTES and data.endswith(b"THE END")


def test_fastest_per_case():
    rows = [dict(case="team B=8 bf16", mode="fwd", provider=p, median_ms=ms)
            for p, ms in (("torch", 2.0), ("cuda", 0.5), ("triton", 0.7))]
    (row,) = gpucheck.fastest_per_case(rows)
    assert (row["fastest"], row["runner_up"], row["ms"]) == ("cuda", "triton", 0.5)
