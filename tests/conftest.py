import os
import sys
import tempfile
import zlib

# A fresh Inductor cache per run: its keys do not cover a custom op's fake implementation, so a
# cache left by an older checkout could replay graphs built for other output shapes.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="vidkern-inductor-"))

# The Triton interpreter must be chosen before triton is first imported (VERIFY.md §1).
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py, tests/tolerance.py


@pytest.fixture(autouse=True)
def _seed_per_test(request, monkeypatch):
    """Fresh, reproducible random inputs per test (seeded from the test's id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    monkeypatch.delenv("VIDKERN_BACKEND", raising=False)


@pytest.fixture
def poison():
    """Uninitialised memory (torch.empty) reads as NaN, so an output element never written fails.
    (Deterministic mode fills it; ``warn_only``: a CUDA op without a deterministic kernel, such
    as ``index_add_``, warns instead of failing the test.)"""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cuda_kernel_device():
    """Where the ``cuda`` backend's kernels run in this session: the GPU when there is one (and
    vidkern._C is built), else the CPU through the emulated twin built from ``csrc/`` (VERIFY.md §3).
    A build failure fails the tests that use it; only an install without ``csrc/`` skips them."""
    from vidkern.backends import cuda
    if torch.cuda.is_available():
        if cuda.extension_error():
            pytest.fail(cuda.extension_error())
        return torch.device("cuda")
    if not os.path.isdir(os.path.join(cuda.CSRC, "emulated")):
        pytest.skip(f"no CUDA sources at {cuda.CSRC} (not a source checkout): the emulator cannot be built")
    cuda.load_emulator()
    return torch.device("cpu")


@pytest.fixture(scope="session")
def aot_rows(tmp_path_factory):
    """One run of ``python -m vidkern.aot --json`` (every recorded Triton variant and every kernel
    of the built extension, sm_80 and sm_90), shared by the tests that read it: its completed
    process and its rows (``vidkern.aot.as_dict``)."""
    import json

    from vidkern import aot
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    run = aot.run_in_subprocess("--json", str(out))
    return run, json.loads(out.read_text()) if out.exists() else []
