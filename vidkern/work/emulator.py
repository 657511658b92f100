"""Counting the CUDA kernels' work in the CPU emulator (``csrc/emulate.h``), for
:mod:`vidkern.work`'s ``--measure`` and the agreement tests of :mod:`vidkern.work.cuda`.

Under ``VIDKERN_EMULATE`` every kernel reaches global memory through the compat helpers
(``vk::ld``/``vk::st`` for scalars, ``vk::ld_warp`` for a warp-uniform scalar — one transaction
per warp, counted once —, ``vk::load``/``vk::store``/``load_row`` for 16-byte packs), which add
the bytes to per-thread tallies; product loops report their multiply-adds (``VK_COUNT_MACS``).
Each launch appends one record to the emulator's work log (name = the launcher's variable for
the kernel, i.e. the kernel's name less ``_kernel``; grid; block; the threads' summed tallies),
read by ``torch.ops.vidkern_emu.work_log``. Shared memory is not counted. In the GPU build the
helpers are plain accesses: the counting costs nothing there.

Torch ops the launchers call (``at::bmm`` for selection's Gram matrices, the small reductions of
the merge backward) are not kernels of this extension and are not counted here.
"""
from __future__ import annotations

import contextlib

from .count import Counted

#: the emulator's multiprocessor count (csrc/compat.h: vk::multiprocessors), which sizes grids
EMULATED_SMS = 4


def _log(clear: bool):
    import torch
    from ..backends import cuda
    cuda.load_emulator()
    names, counts = torch.ops.vidkern_emu.work_log(clear)
    return [Counted(name, grid=tuple(row[0:3]), load_bytes=row[7], store_bytes=row[8], macs=row[9])
            for name, row in zip(names, counts.tolist())]


@contextlib.contextmanager
def emulator_counts():
    """``with emulator_counts() as launches:`` — ``launches`` fills (on exit) with one
    :class:`~vidkern.work.count.Counted` per emulated kernel launch inside the block, in order."""
    _log(clear=True)
    launches: list = []
    try:
        yield launches
    finally:
        launches.extend(_log(clear=True))
