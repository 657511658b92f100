"""The tolerance rule of VERIFY.md; its one home is :mod:`vidkern.verify` (``python -m vidkern.selftest``
uses it too)."""
from vidkern.verify import FLOOR, assert_close, check_against_reference, max_err, run_with_grads  # noqa: F401
