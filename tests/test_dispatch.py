"""Backend selection: priorities, forced backends, the environment variable, reasons."""
import subprocess
import sys

import pytest
import torch

import vidkern
from vidkern import dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_automatic_choice_prefers_torch_on_cpu():
    assert dispatch.select("hsda", CPU, torch.float32).name == "torch"
    assert dispatch.names().index("torch") < dispatch.names().index("reference")


def test_forced_backend_and_env_var(monkeypatch):
    assert dispatch.select("hsda", CPU, torch.float16, backend="reference").name == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select("soft_merge", CPU, torch.float32).name == "reference"
    assert dispatch.select("soft_merge", CPU, torch.float32, backend="torch").name == "torch"  # argument wins


def test_forced_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of \['torch', 'reference'\], got 'flash'"):
        dispatch.select("hsda", CPU, torch.float32, backend="flash")
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="backend='torch' cannot run hsda on cuda.*CUDA is not available"):
            dispatch.select("hsda", CUDA, torch.float32, backend="torch")
        monkeypatch.setenv(dispatch.ENV_VAR, "torch")
        with pytest.raises(NotImplementedError, match="VIDKERN_BACKEND='torch' cannot run"):
            dispatch.select("hsda", CUDA, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="lists reasons only when no backend can run")
def test_no_capable_backend_lists_every_reason():
    with pytest.raises(NotImplementedError, match=r"no vidkern backend can run hsda on cuda.*\n  torch: .*\n  reference: "):
        dispatch.select("hsda", CUDA, torch.float32)


def test_env_var_reaches_the_ops(monkeypatch):
    calls = []
    real = dispatch.select

    def spy(op, device, dtype, backend=None):
        chosen = real(op, device, dtype, backend)
        calls.append(chosen.name)
        return chosen
    monkeypatch.setattr(dispatch, "select", spy)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    x = torch.randn(1, 4, 3)
    vidkern.feature_summary(x)
    monkeypatch.delenv(dispatch.ENV_VAR)
    vidkern.feature_summary(x)
    assert calls == ["reference", "torch"]


def test_info_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "vidkern.info"], capture_output=True, text=True, check=True).stdout
    assert f"vidkern {vidkern.__version__}" in out and f"torch {torch.__version__}" in out
    assert "torch      available" in out and "reference  available" in out
    assert "triton" in out and "cuda" in out


def test_kernels_package_lives_under_vidkern():
    import importlib.util
    assert importlib.util.find_spec("vidkern.kernels") is not None
