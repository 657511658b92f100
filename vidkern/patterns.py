"""Token groups of the attention patterns (SPEC §1.1) — the one home of the grid and group logic.

Tokens come in natural order ``n = (t * Hp + h) * Wp + w`` over a grid ``(T, Hp, Wp)``.
A pattern assigns each token a group id; a token attends only within its group.

- ``"checkerboard"``: ``group = (h + w) % 2``, the same for every frame (FAR's sparse-dense tubes).
- ``"temporal"``: ``group = h * Wp + w`` (TimeSformer-style divided attention in time).
- ``"global"``: one group.
- an int tensor of shape ``(N,)``: explicit group ids (any non-negative integers).
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch

PATTERN_NAMES = ("checkerboard", "temporal", "global")

Pattern = Union[str, torch.Tensor]


def num_tokens(grid) -> int:
    t, hp, wp = grid
    return t * hp * wp


def group_ids(pattern: Pattern, grid, device=None) -> torch.Tensor:
    """int64 ``(N,)`` group id of every token in natural order."""
    if isinstance(pattern, torch.Tensor):
        return pattern.to(device=device, dtype=torch.long)
    t, hp, wp = grid
    hw = torch.arange(hp * wp, device=device)
    if pattern == "checkerboard":
        spatial = (hw // wp + hw % wp) % 2
    elif pattern == "temporal":
        spatial = hw
    elif pattern == "global":
        spatial = torch.zeros_like(hw)
    else:
        raise ValueError(f"pattern must be one of {PATTERN_NAMES} or an int tensor of shape (N,), got {pattern!r}")
    return spatial.repeat(t)


def num_groups(pattern: Pattern, grid) -> int:
    """Number of group ids (``max id + 1``; for named patterns, without looking at data)."""
    if isinstance(pattern, torch.Tensor):
        return host_ids(pattern).num_groups
    _, hp, wp = grid
    return {"checkerboard": min(2, hp * wp), "temporal": hp * wp, "global": 1}[pattern]


@dataclass(frozen=True)
class Bucket:
    """``count`` groups that all hold ``size`` tokens; ``index`` lists their tokens group after group."""

    size: int
    count: int
    index: torch.Tensor  # int64 (count * size,)


@dataclass(frozen=True)
class GroupLayout:
    """Groups bucketed by size, so each bucket runs as one dense batched attention.

    Equal-size groups (checkerboard with even ``Hp*Wp``, temporal) make a single bucket; the
    checkerboard of an odd grid makes two (sizes differ by one per frame).
    """

    num_tokens: int
    buckets: tuple


@dataclass(frozen=True)
class HostIds:
    """An explicit pattern's group ids on the host, with the facts the checks need. Everything here
    is sized by the token count, never by the largest id (an id may be 10**9)."""

    ids: torch.Tensor     # int64, CPU, (N,)
    min: int              # smallest id (0 for an empty pattern)
    max: int              # largest id (-1 for an empty pattern)
    groups: torch.Tensor  # int64: the distinct ids, ascending
    sizes: torch.Tensor   # int64: tokens per distinct id

    @property
    def num_groups(self) -> int:
        """``max id + 1``: the group count of :func:`vidkern.group_mean` (SPEC §1.4)."""
        return self.max + 1

    @property
    def missing(self) -> int:
        """How many ids in ``[0, max id]`` no token has (0 when ``min < 0``: refused elsewhere)."""
        return self.max + 1 - self.groups.numel() if self.min >= 0 else 0

    def missing_examples(self, limit: int = 8) -> list:
        """The first ``limit`` ids in ``[0, max id]`` that no token has (found in O(N))."""
        out, expect = [], 0
        for g in self.groups.tolist():
            while expect < g and len(out) < limit:
                out.append(expect)
                expect += 1
            expect = g + 1
            if len(out) >= limit:
                break
        return out


def _host_facts(ids: torch.Tensor) -> HostIds:
    groups, sizes = torch.unique(ids, sorted=True, return_counts=True)
    lo, hi = (int(groups[0]), int(groups[-1])) if ids.numel() else (0, -1)
    return HostIds(ids, lo, hi, groups, sizes)


# ---------------------------------------------------------------------------- the pattern cache
# What vidkern derives from an explicit pattern tensor (its host copy, group layout, grouped order,
# the Triton kernels' tables) is made once per tensor and reused: a pattern is typically a module
# buffer, and on CUDA the host copy is a device-to-host sync. One cache for all of it, keyed on the
# tensor object and a fingerprint of what can change under it: its version (every in-place op,
# also through ``.detach()``), storage pointer and offset (``p.data = other``, which keeps the
# version), shape, strides, dtype and device. On CPU the values are compared too, so even a write
# through ``p.data`` (which torch does not count) is seen; on CUDA that comparison would be the
# sync the cache exists to avoid, so such a write needs :func:`forget` (or a new tensor).
_CACHE: dict = {}   # (kind, id(tensor), *extra) -> (weakref to the tensor, fingerprint, value)
_CACHE_LIMIT = 1024


def _fingerprint(t: torch.Tensor):
    try:
        version = t._version
    except RuntimeError:   # an inference-mode tensor tracks no version: never cached
        return None
    return (version, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            t.device)


def _cache_get(key, t: torch.Tensor, stamp):
    hit = _CACHE.get(key)
    return hit[2] if hit is not None and hit[0]() is t and stamp is not None and hit[1] == stamp else None


def _cache_put(key, t: torch.Tensor, stamp, value):
    if stamp is None:
        return value
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.clear()
    _CACHE[key] = (weakref.ref(t, lambda _, key=key, cache=_CACHE: cache.pop(key, None)), stamp, value)
    return value


def forget(t: Optional[torch.Tensor] = None) -> None:
    """Drop what is cached for the pattern tensor ``t`` (every pattern when ``None``): needed only
    after writing a CUDA pattern's values through ``t.data``, which changes no version counter."""
    for key in [k for k in _CACHE if t is None or k[1] == id(t)]:
        _CACHE.pop(key, None)


def host_ids(t: torch.Tensor) -> HostIds:
    """The host copy of the explicit pattern ``t`` (one device-to-host copy for a CUDA pattern when
    it is first seen, none on later calls), so the per-call value checks never synchronise."""
    hit = known_host_ids(t)
    if hit is not None:
        return hit
    return _remember(t, t.detach().to("cpu", torch.long))


def known_host_ids(t: torch.Tensor):
    """The cached :class:`HostIds` of ``t`` if it is current (no device access on CUDA), else None —
    e.g. for the meta-device copy of a pattern vidkern made itself (:func:`grouped_order`)."""
    hit = _cache_get(("host", id(t)), t, _fingerprint(t))
    if hit is None:
        return None
    facts, snapshot = hit
    if snapshot is not None and not torch.equal(t, snapshot):
        return None       # written through t.data: the fingerprint cannot see it, the values can
    return facts


def _remember(t: torch.Tensor, ids: torch.Tensor) -> HostIds:
    """Cache ``ids`` (int64, CPU) as the host copy of ``t`` (a CPU tensor with a snapshot of its
    values in its own dtype, compared on every hit: no conversion, no host read on CUDA)."""
    facts = _host_facts(ids)
    snapshot = t.detach().clone() if t.device.type == "cpu" else None
    _cache_put(("host", id(t)), t, _fingerprint(t), (facts, snapshot))
    return facts


def derived(t: torch.Tensor, kind: str, make, *extra):
    """``make(host_ids(t))``, cached per ``(kind, t, *extra)`` for as long as ``t``'s host copy is
    current (so it can never outlive a change of ``t``)."""
    facts = host_ids(t)
    key = (kind, id(t)) + extra
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is t and hit[1] is facts:
        return hit[2]
    return _cache_put(key, t, facts, make(facts))


def _layout_from_ids(ids: torch.Tensor, ids_cpu: torch.Tensor = None) -> GroupLayout:
    ids_cpu = ids.detach().cpu() if ids_cpu is None else ids_cpu
    order = torch.argsort(ids_cpu, stable=True)  # tokens of each group, ascending within the group
    uniq, counts = torch.unique_consecutive(ids_cpu[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    by_size: dict[int, list[torch.Tensor]] = {}
    for start, count in zip(starts.tolist(), counts.tolist()):
        by_size.setdefault(count, []).append(order[start:start + count])
    buckets = tuple(
        Bucket(size=size, count=len(members), index=torch.cat(members).to(ids.device))
        for size, members in sorted(by_size.items(), reverse=True)
    )
    return GroupLayout(num_tokens=ids.numel(), buckets=buckets)


@functools.lru_cache(maxsize=256)
def _named_layout(pattern: str, grid: tuple, device: torch.device) -> GroupLayout:
    return _layout_from_ids(group_ids(pattern, grid, device))


def layout(pattern: Pattern, grid, device) -> GroupLayout:
    """Bucketed group layout; cached for named patterns, and for explicit ones in the pattern cache
    (the host copy is made once: :func:`host_ids`)."""
    device = torch.device(device)
    if isinstance(pattern, torch.Tensor):
        return derived(pattern, "layout", lambda facts: _layout_from_ids(facts.ids.to(device), facts.ids), device)
    return _named_layout(pattern, tuple(int(g) for g in grid), device)


# --------------------------------------------------------------------------- grouped token order
# Tokens may also be stored *group-major* ("grouped" order): group 0's tokens first, then group
# 1's, ..., each group's tokens in natural order. A pattern's sparse heads are then plain
# block-diagonal attention over contiguous runs, which SDPA can run on views (``vidkern.sdpa``).
def group_sizes(pattern: Pattern, grid) -> tuple:
    """Tokens per group, groups by ascending id, ids that no token has left out (named patterns from
    the grid alone; an explicit pattern from its cached host copy, which ``torch.compile`` cannot
    read: :func:`static_sizes` says when they are known)."""
    if isinstance(pattern, torch.Tensor):
        return tuple(host_ids(pattern).sizes.tolist())
    t, hp, wp = grid
    hw = hp * wp
    if pattern == "checkerboard":
        return (t * ((hw + 1) // 2), t * (hw // 2)) if hw > 1 else (t * hw,)
    if pattern == "temporal":
        return (t,) * hw
    return (t * hw,)


def static_sizes(pattern: Pattern) -> bool:
    """Whether :func:`group_sizes` can be known here: always for a named pattern; for a tensor only
    outside ``torch.compile`` tracing and off the meta device (its values must be read)."""
    return not isinstance(pattern, torch.Tensor) or (pattern.device.type != "meta"
                                                     and not torch.compiler.is_compiling())


def _grouped_pair(ids: torch.Tensor, device: torch.device, remember: bool = True) -> tuple:
    """``(perm, grouped ids)`` on ``device`` from ids; with ``remember`` (host ids, eager) the
    grouped ids' host copy is cached with them, so nothing reads them back (not even on meta)."""
    perm = torch.argsort(ids, stable=True)
    grouped = ids[perm]
    if not remember:
        return perm.to(device), grouped.to(device)
    made = grouped.to(device)
    _remember(made, grouped)
    return perm.to(device), made


_NAMED_GROUPED: dict = {}   # (pattern, grid, device) -> (perm, grouped ids)


def grouped_order(pattern: Pattern, grid, device) -> tuple:
    """``(perm, grouped_ids)``, int64 ``(N,)`` each: grouped position ``i`` holds natural token
    ``perm[i]`` (``x_grouped = x[..., perm, :]``; back with ``argsort(perm)``), and
    ``grouped_ids = group_ids[perm]`` (sorted: the pattern as an explicit pattern of grouped
    tokens). Cached per named pattern and grid, and per explicit pattern tensor (the pattern cache).
    While ``torch.compile`` traces, the same few tensor ops are traced instead (no cache, no host
    read: ``fullgraph=True`` holds, and an explicit pattern may be a graph input)."""
    device = torch.device(device)
    if torch.compiler.is_compiling():
        ids = group_ids(pattern, tuple(grid), device) if not isinstance(pattern, torch.Tensor) else pattern.long()
        return _grouped_pair(ids, device, remember=False)
    if isinstance(pattern, torch.Tensor):
        return derived(pattern, "grouped", lambda facts: _grouped_pair(facts.ids, device), device)
    key = (pattern, tuple(int(g) for g in grid), device)
    if key not in _NAMED_GROUPED:
        if len(_NAMED_GROUPED) >= _CACHE_LIMIT:
            _NAMED_GROUPED.clear()
        _NAMED_GROUPED[key] = _grouped_pair(group_ids(pattern, key[1], "cpu"), device)
    return _NAMED_GROUPED[key]
