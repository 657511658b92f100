"""``python -m vidkern.info``: versions, which backends can run here (with reasons), and the rules
that choose among them (dispatch's priority and per-op preferences, hsda's strategy)."""
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


def _usable_devices(be, devices) -> tuple:
    """``(devices where ``be`` can run, {device: reasons it cannot})`` when asked for by name."""
    ok, why = [], {}
    for dev in devices:
        reasons = be.reasons(next(iter(sorted(be.ops))), dev, None, forced=True)
        if reasons:
            why[dev.type] = reasons
        else:
            ok.append(dev.type)
    return ok, why


def report() -> str:
    import os

    cuda = torch.cuda.is_available()
    override = os.environ.get(dispatch.ENV_VAR)
    lines = [
        f"vidkern {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (built for CUDA {torch.version.cuda}), "
        f"triton {_triton_version()}",
        f"CUDA device: {torch.cuda.get_device_name() if cuda else 'none (CUDA not available)'}",
        f"backend override: {dispatch.ENV_VAR}={override!r}" if override else
        f"backend override: none ({dispatch.ENV_VAR} is not set; vidkern chooses per call)",
        "backends, in priority order:",
    ]
    if override and override not in dispatch.names():
        lines.insert(-1, f"  warning: {dispatch.ENV_VAR}={override!r} is not one of {dispatch.names()}; "
                         "every op call will raise")
    devices = [torch.device("cpu"), torch.device("cuda")]
    for name in dispatch.names():
        be = dispatch.get(name)
        why = be.unavailable_reason()
        usable, per_device = _usable_devices(be, devices)
        if why:
            status = f"unavailable: {why}"
        elif usable:
            status = f"available on {', '.join(usable)}"
        else:
            status = "installed, but cannot run on this machine"
        lines.append(f"  {name:<10} {status}")
        for dev in devices:
            dtypes = sorted(str(d).replace("torch.", "") for d in be.dtypes.get(dev.type, ()))
            lines.append(f"    {dev.type}: {', '.join(dtypes) or 'not supported'}; ops: {', '.join(sorted(be.ops))}")
            if not why and dev.type in per_device:
                lines.append(f"      on {dev.type}: {'; '.join(per_device[dev.type])}")
    lines.append("dispatch rules (vidkern.dispatch):")
    lines += [f"  {rule}" for rule in dispatch.rules()]
    from . import sdpa
    from .kernels import limits
    lines.append("hsda strategy (vidkern.sdpa.default_strategy; a forced backend runs 'fused'):")
    for dev in devices:
        small = limits.PACKED_GROUP_MAX["half"]
        rule = ", ".join(f"{order} tokens -> {sdpa.default_strategy(dev, order)}" for order in sdpa.TOKEN_ORDERS)
        rule += (f"; grouped with every sparse group <= {small} tokens (fp16/bf16; fp32: "
                 f"{limits.PACKED_GROUP_MAX['fp32']}) -> {sdpa.default_strategy(dev, 'grouped', small)}")
        lines.append(f"  {dev.type}: {rule}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m vidkern.info", description=(__doc__ or "").strip().splitlines()[0]
                                     if __doc__ else "What vidkern can run here")
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
