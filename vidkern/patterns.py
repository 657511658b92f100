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
from typing import Union

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
        return host_ids(pattern).counts.numel() if pattern.numel() else 0
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
    """An explicit pattern's group ids on the host, with the facts the checks need."""

    ids: torch.Tensor     # int64, CPU, (N,)
    min: int              # smallest id (0 for an empty pattern)
    counts: torch.Tensor  # int64 (max id + 1,): tokens per id (empty if min < 0)
    missing: tuple        # ids in [0, max id] that no token has


_HOST_IDS: dict = {}   # id(tensor) -> (weakref to it, its version, HostIds)


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:   # an inference-mode tensor tracks no version: never cached
        return None


def host_ids(t: torch.Tensor) -> HostIds:
    """The host copy of the explicit pattern ``t``, made once per tensor object and version (for a
    CUDA pattern, one device-to-host copy when it is first seen, none on later calls — a pattern is
    typically a module buffer), so the per-call value checks never synchronise."""
    hit = known_host_ids(t)
    if hit is not None:
        return hit
    return _remember(t, t.detach().to("cpu", torch.long))


def known_host_ids(t: torch.Tensor):
    """The cached :class:`HostIds` of ``t`` if there is one (no device access), else None — e.g.
    for the meta-device copy of a pattern vidkern made itself (:func:`grouped_order`)."""
    hit = _HOST_IDS.get(id(t))
    version = _version(t)
    if hit is not None and hit[0]() is t and version is not None and hit[1] == version:
        return hit[2]
    return None


def _remember(t: torch.Tensor, ids: torch.Tensor) -> HostIds:
    """Cache ``ids`` (int64, CPU) as the host copy of ``t``."""
    key = id(t)
    version = _version(t)
    lo = int(ids.min()) if ids.numel() else 0
    counts = torch.bincount(ids) if lo >= 0 else torch.zeros(0, dtype=torch.long)
    facts = HostIds(ids, lo, counts, tuple(torch.nonzero(counts == 0).flatten().tolist()))
    if version is not None:
        if len(_HOST_IDS) > 256:
            _HOST_IDS.clear()
        _HOST_IDS[key] = (weakref.ref(t, lambda _, key=key, cache=_HOST_IDS: cache.pop(key, None)), version, facts)
    return facts


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


_EXPLICIT_LAYOUTS: dict = {}   # (id(tensor), device) -> (weakref, version, GroupLayout)


@functools.lru_cache(maxsize=256)
def _named_layout(pattern: str, grid: tuple, device: torch.device) -> GroupLayout:
    return _layout_from_ids(group_ids(pattern, grid, device))


def layout(pattern: Pattern, grid, device) -> GroupLayout:
    """Bucketed group layout; cached for named patterns, and for explicit ones per tensor object
    and version (the host copy is made once: :func:`host_ids`)."""
    if isinstance(pattern, torch.Tensor):
        device = torch.device(device)
        key = (id(pattern), device)
        hit = _EXPLICIT_LAYOUTS.get(key)
        version = _version(pattern)
        if hit is not None and hit[0]() is pattern and version is not None and hit[1] == version:
            return hit[2]
        made = _layout_from_ids(pattern.to(device=device, dtype=torch.long), host_ids(pattern).ids)
        if version is not None:
            if len(_EXPLICIT_LAYOUTS) > 256:
                _EXPLICIT_LAYOUTS.clear()
            _EXPLICIT_LAYOUTS[key] = (weakref.ref(pattern, lambda _, key=key, cache=_EXPLICIT_LAYOUTS: cache.pop(key, None)),
                                      version, made)
        return made
    return _named_layout(pattern, tuple(int(g) for g in grid), torch.device(device))


# --------------------------------------------------------------------------- grouped token order
# Tokens may also be stored *group-major* ("grouped" order): group 0's tokens first, then group
# 1's, ..., each group's tokens in natural order. A pattern's sparse heads are then plain
# block-diagonal attention over contiguous runs, which SDPA can run on views (``vidkern.sdpa``).
def group_sizes(pattern: Pattern, grid) -> tuple:
    """Tokens per group, by id (named patterns from the grid alone; an explicit pattern from its
    cached host copy). Ids that no token has count 0."""
    if isinstance(pattern, torch.Tensor):
        return tuple(host_ids(pattern).counts.tolist())
    t, hp, wp = grid
    hw = hp * wp
    if pattern == "checkerboard":
        return (t * ((hw + 1) // 2), t * (hw // 2)) if hw > 1 else (t * hw,)
    if pattern == "temporal":
        return (t,) * hw
    return (t * hw,)


def _grouped_pair(ids: torch.Tensor, device: torch.device) -> tuple:
    """``(perm, grouped ids)`` on ``device`` from host ids; the grouped ids' host copy is cached
    with them, so nothing reads them back (not even on the meta device)."""
    perm = torch.argsort(ids, stable=True)
    grouped = ids[perm]
    made = grouped.to(device)
    _remember(made, grouped)
    return perm.to(device), made


@functools.lru_cache(maxsize=256)
def _named_grouped(pattern: str, grid: tuple, device: torch.device) -> tuple:
    return _grouped_pair(group_ids(pattern, grid, "cpu"), device)


_GROUPED: dict = {}   # (id(tensor), device) -> (weakref, version, (perm, grouped ids))


def grouped_order(pattern: Pattern, grid, device) -> tuple:
    """``(perm, grouped_ids)``, int64 ``(N,)`` each: grouped position ``i`` holds natural token
    ``perm[i]`` (``x_grouped = x[..., perm, :]``; back with ``argsort(perm)``), and
    ``grouped_ids = group_ids[perm]`` (sorted: the pattern as an explicit pattern of grouped
    tokens). Cached per named pattern and grid, and per explicit pattern tensor and version."""
    device = torch.device(device)
    if not isinstance(pattern, torch.Tensor):
        return _named_grouped(pattern, tuple(int(g) for g in grid), device)
    key = (id(pattern), device)
    hit = _GROUPED.get(key)
    version = _version(pattern)
    if hit is not None and hit[0]() is pattern and version is not None and hit[1] == version:
        return hit[2]
    made = _grouped_pair(host_ids(pattern).ids, device)
    if version is not None:
        if len(_GROUPED) > 256:
            _GROUPED.clear()
        _GROUPED[key] = (weakref.ref(pattern, lambda _, key=key, cache=_GROUPED: cache.pop(key, None)), version, made)
    return made
