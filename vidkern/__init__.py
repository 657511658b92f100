"""vidkern: fused kernels for video transformers — FAR attention, TEAM gating, STTM merging.

Ops (all differentiable unless noted, all with ``backend=None``): :func:`hsda`,
:func:`sparse_dense_attention`, :func:`group_mean`, :func:`feature_summary`, :func:`team_gate`,
:func:`select_meta_tokens` and :func:`orthogonal_select` (no gradient), :func:`soft_merge`.
Modules live in :mod:`vidkern.nn`; the math of every op in :mod:`vidkern.reference`.
"""


def _map_kernels():
    """Make ``vidkern.kernels`` the top-level folder ``kernels/`` when running from a source tree.

    ``kernels/`` has no ``__init__.py`` on purpose: a regular package named ``kernels`` at the
    repository root would shadow any installed package of that name (Hugging Face's ``kernels``,
    which transformers imports) wherever the root is on ``sys.path``. A wheel installs the folder as
    ``vidkern/kernels/`` (found by the import system); a source tree or an editable install has it
    beside this package, where ``vidkern.kernels`` is not looked for, so it is mapped here.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    tree = os.path.join(os.path.dirname(here), "kernels")
    if __name__ + ".kernels" in sys.modules or os.path.isdir(os.path.join(here, "kernels")) or not os.path.isdir(tree):
        return
    spec = importlib.machinery.ModuleSpec(__name__ + ".kernels", None, is_package=True)
    spec.submodule_search_locations = [tree]
    sys.modules[spec.name] = importlib.util.module_from_spec(spec)


_map_kernels()

from ._version import __version__  # noqa: E402
from .dispatch import ENV_VAR as BACKEND_ENV_VAR  # noqa: E402
from .ops import (feature_summary, group_mean, hsda, orthogonal_select, select_meta_tokens, soft_merge,  # noqa: E402
                  sparse_dense_attention, team_gate)

__all__ = ["__version__", "BACKEND_ENV_VAR", "hsda", "sparse_dense_attention", "group_mean", "feature_summary",
           "team_gate", "orthogonal_select", "select_meta_tokens", "soft_merge"]

#: submodules reachable as attributes after ``import vidkern`` (``vidkern.nn.HSDAttention``), loaded
#: on first use so that ``import vidkern`` stays light
_SUBMODULES = ("nn", "models", "patterns", "checkpoints", "flops", "work", "sdpa", "dispatch", "reference",
               "library", "checks", "metatokens", "aot", "verify", "kernels")


def __getattr__(name):
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
