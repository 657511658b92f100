"""The GPU the work model prices launches on, and the pricing rule: every constant with its source.

Two machines, both sm_90 (the compiled code the model reads is Triton's and nvcc's sm_90 SASS,
:mod:`vidkern.work.compiled`): :data:`H200` (the GPU the project is lent, the default) and
:data:`H100` (SXM5: the GPU the published attention figures were measured on, used to calibrate;
``docs/verify.md``, "Calibration").

**The terms of one launch** (:func:`price`; all in microseconds, as separate ``--json`` fields).
``programs`` CTAs run in waves: the busiest SM runs ``ceil(programs / SMS)`` of them, so every
throughput term is its work over the whole machine's rate times ``f = programs / (SMS *
ceil(programs / SMS))``, the share of SM time that is busy.

- ``dram_us`` = ``dram_bytes / (HBM * f)``. **The L2 rule**: a launch's compulsory bytes
  (``Launch.unique``: each distinct byte it reads or writes, once) come from or go to DRAM; its
  re-reads (``bytes - unique``) hit L2 when the data the resident programs re-read at once
  (``Launch.working_set``) fits in :attr:`Machine.l2_reuse` — half the L2, one partition — and
  otherwise miss in proportion (``1 - l2_reuse / working_set``). Nothing is assumed to survive in
  L2 between launches (pessimistic for a producer and consumer of a small tensor).
- ``l2_us`` = every issued byte (``l2_bytes = bytes``) at the measured L2 bandwidth.
- ``mma_us`` = issued products at the rate of the instruction kind the SASS uses: ``HGMMA``
  (``wgmma``) at the dense peak, ``HMMA`` (``mma.sync``) at 2/3 of it, TF32 at half the 16-bit
  rate (``tf32x3``: three products per MAC), SIMT fp32 on the FMA units; times ``sustained``.
- ``mufu_us``: the MUFU instructions (exp2, rcp, rsqrt) the SASS issues, 16 lanes per clock per SM.
- ``issue_us``: all warp instructions the SASS issues, 4 per clock per SM at best; a scheduler
  with ``w`` resident warps issues ``min(1, w * ISSUE_ILP / ALU_LATENCY)`` per clock (occupancy,
  from the kernel's CTAs per SM).
- ``serial_us``: a main loop that multiplies on tensor cores *and* exponentiates (attention: a
  softmax between two products) runs, without warp specialisation, its products and its softmax
  one after the other — the softmax needs this step's scores, the next product its
  probabilities — so ``mma_us + max(mufu_us, issue_us)`` (FlashAttention-3 §3.1: the overlap FA3
  adds by ping-pong scheduling is what FA2-style kernels lack; zero for any other launch).
- ``latency_us`` (serial): one exposed global round trip per launch (its first loads), plus per
  sequential step after the first (``steps``: a greedy pick) ``round_trips`` dependent global
  round trips and the block barriers of the step.
- ``launch_us`` (serial): one kernel launch on a stream.

``model_us = max(dram, l2, mma, mufu, issue, serial) + latency + launch``; ``bound`` names the largest
term of all eight. The instruction, MUFU and barrier counts per program are the SASS's
(:func:`vidkern.work.compiled.dynamic`); a launch with no compiled code (a torch op) has only the
memory and product terms, a launch priced at a published rate (an SDPA call) only that and its
launch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Machine:
    name: str
    sms: int                    # streaming multiprocessors
    clock_hz: float             # the tensor-core clock of the datasheet peak
    sustained: float            # share of every clocked peak a long kernel keeps (power, clocks)
    hbm: float                  # DRAM bytes/s a copy achieves
    l2_bw: float                # L2 bytes/s
    l2_reuse: float             # bytes of re-read data that stay in L2 (one partition)
    mem_latency_s: float        # one dependent global round trip
    launch_s: float             # one kernel launch, back to back on a stream
    #: dense multiply-adds per clock per SM by instruction kind and operand type
    mac_per_clk: dict = field(default_factory=dict)
    mufu_per_clk: int = 16      # exp2/rcp/rsqrt lanes per clock per SM
    issue_per_clk: int = 4      # warp instructions per clock per SM (four schedulers)

    def mac_rate(self, kind: str, rate: str) -> float:
        """Multiply-adds per second over the whole GPU for products of ``rate`` (``vidkern.work``'s
        rate keys) on instruction kind ``kind`` (``HGMMA``, ``HMMA``, ``SIMT``), sustained."""
        if rate == "fp32" or kind == "SIMT":
            per = self.mac_per_clk["SIMT"]
        else:
            per = self.mac_per_clk["HGMMA" if kind == "HGMMA" else "HMMA"]
            if rate in ("tf32", "tf32x3"):
                per /= 2
        return per * self.sms * self.clock_hz * self.sustained


_SM90_MACS = {"HGMMA": 2048,            # 989 TFLOP/s dense bf16 = 2048 MAC/clk/SM x 132 x 1.83 GHz (FA3 §3.1)
              "HMMA": 2048 * 2 / 3,     # mma.sync reaches about 2/3 of the wgmma peak (FA3 blog, note 1)
              "SIMT": 128}              # 128 fp32 FMA units per SM (H100 whitepaper: 67 TFLOP/s fp32)
#: cuBLAS's 8192^3 bf16 GEMM reaches ~798 of the 989 TFLOP/s (pranjalssh/fast.cu): what a long
#: kernel keeps of any clocked peak
SUSTAINED = 798 / 989.4
ALU_LATENCY = 4       # cycles of a dependent FP32/INT instruction (Volta-Hopper microbenchmarks, Jia et al.)
ISSUE_ILP = 2         # independent instructions a warp offers per dependency (assumed, not published)
BARRIER_CLK = 30      # cycles of one block barrier with every warp arrived (assumed, not published)

#: the lent H200 (SXM, 141 GB HBM3e): a copy moves ~4.3 TB/s, L2 ~10 TB/s measured (gpu-benches h200.txt)
H200 = Machine("H200", sms=132, clock_hz=1.83e9, sustained=SUSTAINED, hbm=4.3e12, l2_bw=10e12,
               l2_reuse=25e6, mem_latency_s=650 / 1.83e9, launch_s=2.5e-6, mac_per_clk=_SM90_MACS)
#: H100 SXM5 (80 GB HBM3, 3.35 TB/s peak): copy taken at the H200's measured share of its peak
#: (4.3 / 4.8), L2 as measured on the H200 (same 50 MB L2 design)
H100 = Machine("H100", sms=132, clock_hz=1.83e9, sustained=SUSTAINED, hbm=3.35e12 * 4.3 / 4.8, l2_bw=10e12,
               l2_reuse=25e6, mem_latency_s=650 / 1.83e9, launch_s=2.5e-6, mac_per_clk=_SM90_MACS)
MACHINES = {"h200": H200, "h100": H100}
MACHINE = H200

TERMS = ("dram_us", "l2_us", "mma_us", "mufu_us", "issue_us", "serial_us", "latency_us", "launch_us")
THROUGHPUT = TERMS[:6]


def busy(programs: int, machine: Machine) -> float:
    """``f``: the share of SM time busy when ``programs`` CTAs run in waves over the SMs."""
    return programs / (machine.sms * math.ceil(programs / machine.sms))


def dram_bytes(nbytes: int, unique, working_set: float, machine: Machine) -> float:
    """The L2 rule (module docstring): compulsory bytes plus the re-reads that miss."""
    unique = nbytes if unique is None else min(unique, nbytes)
    miss = 0.0 if working_set <= machine.l2_reuse else 1.0 - machine.l2_reuse / working_set
    return unique + (nbytes - unique) * miss


def issue_rate(warps_per_sm: float, machine: Machine) -> float:
    """Warp instructions per second one SM issues with ``warps_per_sm`` resident warps."""
    per_scheduler = min(1.0, warps_per_sm / machine.issue_per_clk * ISSUE_ILP / ALU_LATENCY)
    return machine.issue_per_clk * per_scheduler * machine.clock_hz * machine.sustained


def price(launch, machine: Machine = None) -> dict:
    """The terms of one launch, ``model_us`` and ``bound`` (module docstring). ``launch`` is a
    :class:`vidkern.work.Launch`."""
    from .compiled import dynamic, lookup
    m = machine or MACHINE
    out = dict.fromkeys(TERMS, 0.0)
    out.update(dram_bytes=0.0, l2_bytes=launch.bytes, mma_kind="", compiled="")
    if launch.programs <= 0:
        return dict(out, model_us=0.0, bound="-")
    out["launch_us"] = m.launch_s * 1e6
    out["dram_bytes"] = dram_bytes(launch.bytes, launch.unique, launch.working_set, m)
    if launch.published_us is not None:      # a library kernel priced at its published rate
        out["published_us"] = launch.published_us
        return _finish(out, extra=("published_us",))
    f = busy(launch.programs, m)
    out["dram_us"] = out["dram_bytes"] / (m.hbm * f) * 1e6
    out["l2_us"] = launch.bytes / (m.l2_bw * f) * 1e6
    entry = lookup(launch)
    kind = entry["tensor_cores"] if entry else ("HGMMA" if launch.kernel.startswith("aten.") else "HMMA")
    if launch.macs:
        kind = "SIMT" if kind == "none" else kind
        out["mma_kind"] = kind
        issued = launch.macs * (3 if launch.rate == "tf32x3" else 1)
        out["mma_us"] = issued / (m.mac_rate(kind, launch.rate) * f) * 1e6
    latency = m.mem_latency_s
    if entry:
        out["compiled"] = entry["key"]
        per = dynamic(entry, launch)                 # per program, per warp
        warps = entry["warps"]
        resident = min(entry["ctas_per_sm"] or 1, math.ceil(launch.programs / m.sms)) * warps
        out["mufu_us"] = (per["mufu"] * warps * launch.programs * 32
                          / (m.mufu_per_clk * m.clock_hz * m.sustained * m.sms * f) * 1e6)
        out["issue_us"] = per["instr"] * warps * launch.programs / (issue_rate(resident, m) * m.sms * f) * 1e6
        loop = entry["loop"] or {}
        if launch.macs and loop.get("mma") and loop.get("mufu"):
            out["serial_us"] = out["mma_us"] + max(out["mufu_us"], out["issue_us"])
        # a greedy step is the loop around the main one when there is one (the row scan inside the
        # step loop), else the main loop itself
        step_bars = (entry.get("outer") or entry["loop"] or {}).get("bar", 0) if launch.steps > 1 else 0
    else:
        step_bars = 0
    per_step = launch.round_trips * m.mem_latency_s + step_bars * BARRIER_CLK / m.clock_hz
    out["latency_us"] = (latency + max(launch.steps - 1, 0) * per_step) * 1e6
    return _finish(out)


def _finish(out: dict, extra: tuple = ()) -> dict:
    terms = THROUGHPUT + extra
    out["model_us"] = max(out[t] for t in terms) + out["latency_us"] + out["launch_us"]
    every = terms + ("latency_us", "launch_us")
    out["bound"] = max(every, key=lambda t: out[t])[:-3]
    return out
