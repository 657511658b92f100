"""Triton kernels of vidkern, installed as ``vidkern.kernels`` (never as a top-level module).

One file per kernel family — kernels, then launchers (config choice, tables, grid):
``hsda`` (FAR's head-split sparse-dense attention), ``team`` (TEAM's ``feature_summary`` and
``team_gate``), ``selection`` (STTM's greedy meta-token selection), ``merge`` (STTM's soft
merging), all forward and backward; ``launch`` holds what every launcher shares (device guard,
grid limits, per-Triton-version tables, ``tl.dot`` precision, the ``AotSpec`` each module exports
through ``aot_specs``). The backend that calls them is :mod:`vidkern.backends.triton`;
``python -m vidkern.aot`` compiles every launchable variant for sm_80/sm_90 and reports
registers, shared memory and spills.
"""
