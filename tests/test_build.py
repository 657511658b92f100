"""setup.py's decisions about the CUDA extension, and what vidkern reports when it is missing."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(**env):
    """``python setup.py --version``: runs the extension decision without building anything (in an
    environment without the caller's VIDKERN_* settings, such as CI's VIDKERN_FORCE_BUILD=1)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VIDKERN_")}
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**clean, **env})


def test_skip_installs_the_pure_python_package():
    run = _setup(VIDKERN_SKIP_CUDA_BUILD="1")
    assert run.returncode == 0, run.stderr
    assert "VIDKERN_SKIP_CUDA_BUILD=1: installing vidkern without its CUDA extension" in run.stderr


def test_missing_toolkit_warns_and_force_fails():
    run = _setup(CUDA_HOME="/nonexistent-toolkit")
    assert run.returncode == 0, run.stderr
    assert "installing vidkern without its CUDA extension: no CUDA toolkit found" in run.stderr
    run = _setup(CUDA_HOME="/nonexistent-toolkit", VIDKERN_FORCE_BUILD="1")
    assert run.returncode != 0
    assert "VIDKERN_FORCE_BUILD=1 but the CUDA extension cannot be built: no CUDA toolkit found" in run.stderr


def test_info_says_why_the_cuda_backend_is_unavailable():
    """With vidkern._C unloadable, `python -m vidkern.info` reports the cuda backend unavailable,
    with the reason, and the other backends still work."""
    code = ("import sys, runpy, importlib.util; find = importlib.util.find_spec; "
            # the library file is there (find_spec finds it) but `import vidkern._C` fails
            "importlib.util.find_spec = lambda n, *a: object() if n == 'vidkern._C' else find(n, *a); "
            "sys.modules['vidkern._C'] = None; "
            "runpy.run_module('vidkern.info', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("cuda "))
    assert "unavailable: vidkern._C is built but does not load" in line
    assert any(ln.strip().startswith("torch ") and "available" in ln for ln in out.splitlines())
