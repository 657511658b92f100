"""Triton kernels of vidkern, installed as ``vidkern.kernels`` (never as a top-level module).

One file per op — kernels, then launchers (config choice, tables, grid): ``hsda`` (FAR's
head-split sparse-dense attention, forward and backward). The backend that calls them is
:mod:`vidkern.backends.triton`; ``python -m vidkern.aot`` compiles every launchable variant
for sm_80/sm_90 and reports registers, shared memory and spills.
"""
