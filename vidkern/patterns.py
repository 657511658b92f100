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
        return int(pattern.max().item()) + 1 if pattern.numel() else 0
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


def _layout_from_ids(ids: torch.Tensor) -> GroupLayout:
    ids_cpu = ids.detach().cpu()
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
    """Bucketed group layout; cached for named patterns (one host sync for explicit ones)."""
    if isinstance(pattern, torch.Tensor):
        return _layout_from_ids(pattern.to(device=device, dtype=torch.long))
    return _named_layout(pattern, tuple(int(g) for g in grid), torch.device(device))
