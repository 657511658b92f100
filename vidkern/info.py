"""``python -m vidkern.info``: versions and which backends can run here, with reasons."""
from __future__ import annotations

import platform

import torch

from . import __version__, dispatch
from . import ops  # noqa: F401  (registers the backends)


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as exc:  # a broken triton install must not break the report
        return f"not importable ({type(exc).__name__}: {exc})"


def report() -> str:
    cuda = torch.cuda.is_available()
    lines = [
        f"vidkern {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (built for CUDA {torch.version.cuda}), "
        f"triton {_triton_version()}",
        f"CUDA device: {torch.cuda.get_device_name() if cuda else 'none (CUDA not available)'}",
        f"backend override: ${dispatch.ENV_VAR}",
        "backends, in priority order:",
    ]
    devices = [torch.device("cpu"), torch.device("cuda")]
    for name in dispatch.names():
        be = dispatch.get(name)
        why = be.unavailable_reason()
        status = f"unavailable: {why}" if why else "available"
        lines.append(f"  {name:<10} {status}")
        for dev in devices:
            dtypes = sorted(str(d).replace("torch.", "") for d in be.dtypes.get(dev.type, ()))
            lines.append(f"    {dev.type}: {', '.join(dtypes) or 'not supported'}; ops: {', '.join(sorted(be.ops))}")
            if not why:
                extra = be.not_supported_reasons(next(iter(be.ops)), dev, None, forced=True)
                if extra:
                    lines.append(f"      on {dev.type}: {'; '.join(extra)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
