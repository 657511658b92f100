"""The source tree never shadows an installed package, and vidkern.kernels is the kernels/ folder.

Python puts the working directory first on ``sys.path`` (``python -m pytest``, ``python -c``, a
notebook), so any regular package at the repository root hides an installed one of the same name:
our ``kernels/`` hid Hugging Face's ``kernels`` and broke transformers (kernels/README.md).
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: setup.py must sit at the root (pip's build interface); vidkern is the package itself.
OURS = {"setup", "vidkern"}


def _run(code, cwd, **env):
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={**clean, **env})
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def _root_names():
    """Every name ``import`` could resolve in the repository root: folders and .py modules."""
    names = set()
    for entry in os.listdir(ROOT):
        name = entry[:-3] if entry.endswith(".py") else entry
        if name.isidentifier() and (entry.endswith(".py") or os.path.isdir(os.path.join(ROOT, entry))):
            names.add(name)
    return sorted(names - OURS)


def test_no_root_entry_shadows_an_installed_package(tmp_path):
    """For every importable name at the root, a regular package of that name installed elsewhere
    (here: on PYTHONPATH, which comes after the working directory) is what ``import`` returns."""
    names = _root_names()
    assert "kernels" in names and "tests" in names
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    code = "import importlib\n" + "".join(f"print(importlib.import_module({n!r}).__file__)\n" for n in names)
    found = _run(code, ROOT, PYTHONPATH=str(tmp_path)).splitlines()
    shadowed = [n for n, f in zip(names, found) if not f.startswith(str(tmp_path))]
    assert not shadowed, f"the source tree shadows installed packages: {shadowed}"


def test_transformers_builds_videomae_from_the_root():
    """The reported failure: transformers imports Hugging Face's ``kernels``; run from the root."""
    pytest.importorskip("transformers", reason="transformers is the optional extra 'hf'")
    code = ("import transformers, torch\n"
            "cfg = transformers.VideoMAEConfig(image_size=32, num_frames=2, hidden_size=16, num_hidden_layers=1,"
            " num_attention_heads=2, intermediate_size=32)\n"
            "model = transformers.VideoMAEModel(cfg)\n"
            "print(tuple(model(torch.randn(1, 2, 3, 32, 32)).last_hidden_state.shape))\n"
            "import sys; k = sys.modules.get('kernels'); print(getattr(k, '__file__', None))\n")
    shape, kernels_file = _run(code, ROOT).splitlines()
    assert shape == "(1, 4, 16)"   # (2 frames / tubelet 2) x (32 / 16)^2 patches
    assert kernels_file == "None" or not kernels_file.startswith(os.path.join(ROOT, "kernels"))


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_vidkern_kernels_is_the_kernels_folder(where, tmp_path):
    """``vidkern.kernels`` holds the Triton kernels from the repository root and from anywhere
    else (an editable install maps it to kernels/, a wheel installs vidkern/kernels/)."""
    code = ("import pkgutil, vidkern.kernels as k, vidkern.kernels.limits as limits\n"
            "print(limits.__file__); print(sorted(m.name for m in pkgutil.iter_modules(k.__path__)))")
    path, modules = _run(code, ROOT if where == "root" else tmp_path).splitlines()
    assert os.path.basename(os.path.dirname(path)) == "kernels" and path.endswith("limits.py")
    assert modules == str(sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py")))
