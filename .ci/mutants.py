"""Mutation testing: plant one realistic bug at a time and check that the suite catches it.

  python .ci/mutants.py              every mutant (make mutants)
  python .ci/mutants.py ID [ID ...]  only these
  python .ci/mutants.py --list       the mutants, one line each

Each mutant is one exact text replacement in one file (the text must occur exactly once, so a
refactor that moves it is reported, not silently skipped) and the tests that should catch it.
The tool copies the working tree to a temporary folder, applies the mutant there, and runs
``python -m pytest -x`` on those tests from that copy (the repository root comes first on
``sys.path``, so the copy's ``vidkern``, ``kernels/`` and ``csrc/`` are what run; the CUDA
emulator is built into a fresh ``TORCH_EXTENSIONS_DIR``). A mutant the tests pass on is a
*survivor*: the run prints each verdict and the score and exits 1 if anything survived or could
not be applied. Run it after changing a test or a kernel it names; it is not part of CI
(a few minutes per emulator mutant).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    old: str
    new: str
    tests: tuple        # pytest arguments
    bug: str            # what a developer could really get wrong


MUTANTS = [
    # --- softmax stability (an overflow that ordinary inputs never reach)
    Mutant("team-triton-no-max", "kernels/team.py",
           "e = tl.where(mask, tl.exp(xm - m[:, None]), 0.0)", "e = tl.where(mask, tl.exp(xm), 0.0)",
           ("tests/test_backends.py", "-k", "triton and team_gate"),
           "TEAM channel softmax without its max subtraction (Triton)"),
    Mutant("team-cuda-softmax-no-max", "csrc/team.cu",
           "vk::st(out + n, expf(vk::ld(in + n) - m) * inv_z);", "vk::st(out + n, expf(vk::ld(in + n)) * inv_z);",
           ("tests/test_backends.py", "-k", "cuda and team_gate"),
           "TEAM token softmax output without its max (CUDA)"),
    # --- barriers
    Mutant("team-cuda-scratch-barrier", "csrc/team.cu",
           "  __syncthreads();  // scratch may still be read from a previous reduction\n", "\n",
           ("tests/test_emulator_races.py",),
           "the barrier before shared scratch is reused removed (CUDA block_reduce)"),
    # --- precision
    Mutant("fp32-dot-tf32", "kernels/launch.py",
           'return "tf32x3" if dtype == torch.float32 else "tf32"', 'return "tf32"',
           ("tests/test_aot.py", "-k", "precision"),
           "float32 products downgraded from tf32x3 to tf32"),
    # --- masks
    Mutant("hsda-tile-key-mask", "kernels/hsda.py",
           '        qk = tl.where(mask_n[None, :], qk, float("-inf"))\n        m_new',
           "        m_new",
           ("tests/test_triton_hsda.py",),
           "attention forward without the key mask (ragged tiles and other groups' keys attended)"),
    Mutant("hsda-packed-group-mask", "kernels/hsda.py",
           'qk = tl.where((gi[:, None] == gi[None, :]) & valid[None, :], qk, float("-inf"))\n    m =',
           'qk = tl.where(valid[None, :], qk, float("-inf"))\n    m =',
           ("tests/test_triton_hsda.py",),
           "packed small-group tiles attend across groups"),
    Mutant("merge-token-mask", "kernels/merge.py",
           's = tl.where(mask_n[None, :], s, float("-inf"))', "s = s",
           ("tests/test_backends.py", "-k", "triton and soft_merge"),
           "soft merge forward without its meta-column mask"),
    Mutant("checkerboard-formula", "vidkern/patterns.py",
           "spatial = (hw // wp + hw % wp) % 2", "spatial = (hw // wp) % 2",
           ("tests/test_reference.py", "tests/test_strategies.py"),
           "checkerboard groups computed as alternating rows"),
    # --- scales
    Mutant("hsda-exp2-scale", "kernels/hsda.py",
           "    qk_scale = scale * 1.4426950408889634                     # exp2 domain",
           "    qk_scale = scale",
           ("tests/test_triton_hsda.py",),
           "exp2-domain softmax without the log2(e) factor (Triton forward)"),
    Mutant("hsda-packed-dq-scale", "kernels/hsda.py",
           "    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=mask)",
           "    tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=mask)",
           ("tests/test_triton_hsda.py", "tests/test_backends.py", "-k", "triton and hsda"),
           "packed backward dQ without the softmax scale"),
    Mutant("merge-cuda-tau", "csrc/sttm.cu",
           "const float ds = t.c1[i][j] * (t.dc1[i][j] - delta[i]) * a.inv_tau, c = t.c[i][j];",
           "const float ds = t.c1[i][j] * (t.dc1[i][j] - delta[i]), c = t.c[i][j];",
           ("tests/test_backends.py", "-k", "cuda and soft_merge"),
           "soft merge backward dS without 1/tau (CUDA)"),
    # --- signs
    Mutant("hsda-ds-sign", "kernels/hsda.py",
           "    ds = p * (dp - delta[:, None])\n    dq =", "    ds = p * (delta[:, None] - dp)\n    dq =",
           ("tests/test_triton_hsda.py", "tests/test_backends.py", "-k", "triton and hsda"),
           "packed backward dS with its sign flipped"),
    Mutant("merge-ds-sign", "kernels/merge.py",
           "ds = c1 * (dc1 - delta[:, None]) * inv_tau", "ds = c1 * (delta[:, None] - dc1) * inv_tau",
           ("tests/test_backends.py", "-k", "triton and soft_merge"),
           "soft merge backward dS with its sign flipped (Triton)"),
    Mutant("summary-torch-sign", "vidkern/backends/pytorch.py",
           "dx = (xa - fa[:, None]).add_(1)", "dx = (fa[:, None] - xa).add_(1)",
           ("tests/test_backends.py", "-k", "torch and feature_summary"),
           "feature summary backward (1 + X - f) written as (1 - X + f)"),
    # --- tie-breaks
    Mutant("select-cuda-tie-break", "csrc/sttm.cu",
           "if (ob < best || (ob == best && oa < arg)) {", "if (ob < best || (ob == best && oa > arg)) {",
           ("tests/test_sttm_kernels.py", "-k", "ties"),
           "greedy selection's warp reduction takes the highest index on ties (CUDA)"),
    Mutant("select-triton-tie-break", "kernels/selection.py",
           "cur = tl.argmin(score, 0, tie_break_left=True).to(tl.int32)",
           "cur = (BLOCK_L - 1 - tl.argmin(tl.flip(score, 0), 0, tie_break_left=True)).to(tl.int32)",
           ("tests/test_sttm_kernels.py", "-k", "ties"),
           "greedy selection breaks ties toward the highest index (Triton)"),
    # --- dropped checks
    Mutant("negative-index-check", "vidkern/checks.py",
           "    if t.numel() and not bool(((t >= 0) & (t < high)).all()):",
           "    if t.numel() and not bool((t < high).all()):",
           ("tests/test_validation.py", "-k", "negative_and"),
           "eager index check without the lower bound"),
    Mutant("distinct-idx-check", "vidkern/checks.py",
           'checked = index_range("idx", idx, length, "token indices", distinct=True)',
           'checked = index_range("idx", idx, length, "token indices")',
           ("tests/test_validation.py", "-k", "repeated"),
           "soft_merge's repeated-meta-token check dropped"),
    Mutant("grid-token-count-check", "vidkern/checks.py",
           "    if num_tokens is not None and patterns.num_tokens(value) != num_tokens:",
           "    if False:",
           ("tests/test_validation.py", "tests/test_new_user.py", "-k", "grid or CLS or small_asks"),
           "N == T * Hp * Wp no longer checked"),
    Mutant("compiled-group-ids-assert", "vidkern/checks.py",
           'torch._assert_async(used.all(), f"pattern tensor must use every group id in [0, {groups})")',
           "pass",
           ("tests/test_patterns.py", "-k", "compiled_group_mean"),
           "compiled group_mean no longer asserts that every group is used (NaN means)"),
    # --- caches
    Mutant("pattern-cache-storage", "vidkern/patterns.py",
           "    return (version, t.untyped_storage().data_ptr(), t.storage_offset(),",
           "    return (version, 0, t.storage_offset(),",
           ("tests/test_patterns.py", "-k", "changed or cache_key"),
           "pattern cache keyed on the version only (p.data = other serves stale ids on CUDA)"),
]


def _copy_tree(dest: str) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored) into ``dest``."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def run(mutant: Mutant) -> tuple:
    """``(verdict, seconds)``: "caught" (a test failed), "SURVIVED", "BROKEN (...)" (the tests
    errored instead: the mutant does not build) or "NOT APPLICABLE (...)"."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"vidkern-mutant-{mutant.id}-") as tree:
        _copy_tree(tree)
        path = os.path.join(tree, mutant.path)
        text = open(path).read()
        if text.count(mutant.old) != 1:
            return f"NOT APPLICABLE ({mutant.path} holds the text {text.count(mutant.old)} times)", 0.0
        open(path, "w").write(text.replace(mutant.old, mutant.new))
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(tree, ".torch_extensions"), PYTHONDONTWRITEBYTECODE="1")
        env.pop("VIDKERN_BACKEND", None)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode == 5:
        return "NOT APPLICABLE (its tests selected nothing)", time.time() - t0
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    if result.returncode != 0 and " failed" not in summary:
        # an error (a build that no longer compiles, a collection error) is not a test catching it
        return f"BROKEN ({summary})", time.time() - t0
    return ("caught" if result.returncode != 0 else "SURVIVED"), time.time() - t0


def main(argv) -> int:
    if argv[:1] == ["--list"]:
        for m in MUTANTS:
            print(f"{m.id:<28} {m.path:<28} {m.bug}")
        return 0
    chosen = [m for m in MUTANTS if not argv or m.id in argv]
    unknown = set(argv) - {m.id for m in MUTANTS}
    if unknown:
        print(f"unknown mutants: {sorted(unknown)}; --list shows them", file=sys.stderr)
        return 2
    bad = []
    for m in chosen:
        verdict, seconds = run(m)
        print(f"{m.id:<28} {verdict:<12} {seconds:6.0f} s   {m.bug}", flush=True)
        if verdict != "caught":
            bad.append(m.id)
    print(f"mutants: {len(chosen) - len(bad)} of {len(chosen)} caught" + (f"; not caught: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
