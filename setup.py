"""vidkern build.

The Triton kernels live in ``kernels/`` and install as ``vidkern.kernels`` (never as a
top-level ``kernels`` module). The CUDA extension ``vidkern._C`` (sources in ``csrc/``) is not
built yet; when it is, it will be added to ``ext_modules`` below behind
``VIDKERN_SKIP_CUDA_BUILD`` / ``VIDKERN_FORCE_BUILD`` / ``VIDKERN_CUDA_ARCHS`` / ``MAX_JOBS``.
"""
import os

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, "vidkern", "_version.py")) as f:
    exec(f.read(), version)


def cuda_extensions():
    """CUDA extension modules: none yet (the TEAM/STTM CUDA kernels bring the first)."""
    return []


setup(
    name="vidkern",
    version=version["__version__"],
    description="Fused GPU kernels for video transformers: FAR sparse-dense attention, TEAM, STTM",
    long_description=open(os.path.join(here, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vidkern", "vidkern.backends", "vidkern.nn", "vidkern.kernels"],
    package_dir={"vidkern.kernels": "kernels"},
    install_requires=["torch>=2.14", "triton>=3.8", "numpy"],
    extras_require={
        "test": ["pytest>=8", "hypothesis"],
        "bench": ["pytest>=8", "pytest-benchmark", "matplotlib"],
        "hf": ["transformers"],
    },
    ext_modules=cuda_extensions(),
)
