"""One home per limit and constant (vidkern.kernels.limits): importable without triton, read by
the backends, the reference and the kernels, and given to csrc/ as -D flags (no copy there)."""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

from vidkern import dispatch, reference
from vidkern.backends import cuda as cuda_backend
from vidkern.kernels import limits


def test_limits_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from vidkern.kernels import limits\n"
            "print(limits.NORM_EPS, limits.TEAM_MAX_CHANNELS, limits.HSDA_HEAD_DIMS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1e-12", "1024", "(32,", "64,", "128)"]


def test_every_reader_takes_the_one_value():
    assert reference.NORM_EPS is limits.NORM_EPS
    assert dispatch.get("triton").max_channels == dispatch.get("cuda").max_channels == limits.TEAM_MAX_CHANNELS
    assert dispatch.get("triton").max_head_dim == max(limits.HSDA_HEAD_DIMS)
    assert limits.accumulation_dtype(torch.float64) == torch.float64
    assert all(limits.accumulation_dtype(d) == torch.float32 for d in (torch.float16, torch.bfloat16, torch.float32))
    assert limits.hsda_head_dim_reasons(64, torch.float32) == []
    assert "not one of 32, 64, 128" in limits.hsda_head_dim_reasons(48, torch.float16)[0]
    assert "float32 with head dim 128 > 64" in limits.hsda_head_dim_reasons(128, torch.float32)[0]


def test_csrc_gets_the_constants_as_flags_and_holds_no_copy():
    assert limits.cpp_defines() == ["-DVK_NORM_EPS=1e-12f", "-DVK_TEAM_MAX_CHANNELS=1024"]
    sources = glob.glob(os.path.join(cuda_backend.CSRC, "*.cu"))
    if not sources:
        pytest.skip(f"no CUDA sources at {cuda_backend.CSRC} (an installed package, not a source checkout)")
    for path in sources:
        text = open(path).read()
        assert not re.search(r"\b1e-12f?\b", text), path
        assert not re.search(r"kMaxChannels\s*=\s*\d", text), path
    text = "".join(open(p).read() for p in sources)
    assert "#error" in text and "VK_NORM_EPS" in text and "VK_TEAM_MAX_CHANNELS" in text
