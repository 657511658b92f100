"""Triton kernels of vidkern, installed as ``vidkern.kernels`` (never as a top-level module).

One file per kernel family, each in the same order — the ``@triton.jit`` kernels, then the launch
configuration (one type for every family: ``launch.Config``, tiles by constexpr name, warps,
stages), then the launchers, then ``aot_specs(dtype)``, every configuration the launchers can
pick: ``hsda`` (FAR's head-split sparse-dense attention), ``team`` (TEAM's
``feature_summary`` and ``team_gate``), ``selection`` (STTM's greedy meta-token selection),
``merge`` (STTM's soft merging), all forward and backward. ``launch`` holds what every launcher
shares (device guard, grid limits, per-Triton-version tables, ``tl.dot`` precision, the
``Config`` and ``AotSpec`` types); ``limits`` the limits and constants the kernels share with their callers
(importable without triton). The backend that calls them is :mod:`vidkern.backends.triton`;
``python -m vidkern.aot`` finds every module with ``aot_specs``, compiles each configuration for
sm_80 and sm_90 and reports registers, shared memory and spills.
"""
