"""Triton kernels of vidkern, installed as ``vidkern.kernels``.

No Triton kernel ships in this release: the ``triton`` backend of each op lands with its own
kernels (one file per op: kernels, launcher, autograd wiring) and registers in
:mod:`vidkern.backends`.
"""
