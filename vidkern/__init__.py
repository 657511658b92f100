"""vidkern: fused kernels for video transformers — FAR attention, TEAM gating, STTM merging.

Ops (all differentiable unless noted, all with ``backend=None``): :func:`hsda`,
:func:`sparse_dense_attention`, :func:`group_mean`, :func:`feature_summary`, :func:`team_gate`,
:func:`select_meta_tokens` and :func:`orthogonal_select` (no gradient), :func:`soft_merge`.
Modules live in :mod:`vidkern.nn`; the math of every op in :mod:`vidkern.reference`.
"""
from ._version import __version__
from .dispatch import ENV_VAR as BACKEND_ENV_VAR
from .ops import (feature_summary, group_mean, hsda, orthogonal_select, select_meta_tokens, soft_merge,
                  sparse_dense_attention, team_gate)

__all__ = ["__version__", "BACKEND_ENV_VAR", "hsda", "sparse_dense_attention", "group_mean", "feature_summary",
           "team_gate", "orthogonal_select", "select_meta_tokens", "soft_merge"]
