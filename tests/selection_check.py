"""Judging greedy most-orthogonal picks by float64 optimality; its one home is :mod:`vidkern.verify`
(``python -m vidkern.selftest`` uses it too)."""
from vidkern.verify import FLOAT32_TOLERANCE, TOLERANCE, assert_greedy_picks  # noqa: F401
