"""vidkern build.

The Triton kernels live in ``kernels/`` and install as ``vidkern.kernels`` (never as a top-level
``kernels`` module). The CUDA extension ``vidkern._C`` (sources in ``csrc/``) is built when torch
is a CUDA build and a CUDA toolkit (``nvcc``) is found; otherwise the pure-Python package is
installed with a warning, and ``python -m vidkern.info`` says why the ``cuda`` backend is off.
torch must be importable at build time: ``pip install torch`` first, then
``pip install --no-build-isolation .`` (the Makefile does this).

Environment:
  VIDKERN_SKIP_CUDA_BUILD=1   never build the extension
  VIDKERN_FORCE_BUILD=1       fail instead of warning when it cannot be built
  VIDKERN_CUDA_ARCHS="80;90"  compute capabilities to compile for (the default)
  MAX_JOBS=N                  parallel compile jobs (read by torch's BuildExtension)
  CUDA_HOME                   the toolkit folder (holding include/cuda_runtime.h); else found from nvcc
"""
import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, "vidkern", "_version.py")) as f:
    exec(f.read(), version)

CSRC = "csrc"
# module.cpp (the Python module) and every kernel family's .cu: a new family needs no edit here
CUDA_SOURCES = [f"{CSRC}/module.cpp"] + sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, CSRC, "*.cu")))


def _toolkit_home():
    """The CUDA toolkit folder: the one holding include/cuda_runtime.h, lib64/libcudart.so and bin/nvcc.
    (The nvcc on PATH may be a wrapper script outside the toolkit, so its parent folder is only a guess.)"""
    nvcc = shutil.which("nvcc")
    guesses = [os.environ.get("CUDA_PATH"), os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
               "/usr/local/cuda"]
    if os.environ.get("CUDA_HOME"):   # an explicit choice is not second-guessed
        guesses = [os.environ["CUDA_HOME"]]
    for home in filter(None, guesses):
        if (os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
                and os.path.isfile(os.path.join(home, "bin", "nvcc"))
                and any(os.path.exists(os.path.join(home, lib, "libcudart.so")) for lib in ("lib64", "lib"))):
            return home
    return None


def _why_no_cuda_build(torch):
    if torch is None:
        return ("torch is not importable at build time; install torch first, then "
                "`pip install --no-build-isolation .`")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if _toolkit_home() is None:
        return "no CUDA toolkit found (set CUDA_HOME to the folder holding include/cuda_runtime.h and bin/nvcc)"
    return None


def _limits():
    """``kernels/limits.py``, loaded from the source tree (the package is not installed yet)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_vidkern_limits", os.path.join(here, "kernels", "limits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extensions():
    """``[vidkern._C]`` when it can be built, else ``[]`` with a warning (an error with VIDKERN_FORCE_BUILD=1)."""
    if os.environ.get("VIDKERN_SKIP_CUDA_BUILD") == "1":
        warnings.warn("VIDKERN_SKIP_CUDA_BUILD=1: installing vidkern without its CUDA extension")
        return []
    try:
        import torch
    except ImportError:
        torch = None
    reason = _why_no_cuda_build(torch)
    if reason:
        if os.environ.get("VIDKERN_FORCE_BUILD") == "1":
            sys.exit(f"VIDKERN_FORCE_BUILD=1 but the CUDA extension cannot be built: {reason}")
        warnings.warn(f"installing vidkern without its CUDA extension: {reason}")
        return []
    os.environ["CUDA_HOME"] = _toolkit_home()   # read by torch.utils.cpp_extension at import
    archs = os.environ.get("VIDKERN_CUDA_ARCHS", "80;90")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs.replace(",", ";").split(";") if a)
    from torch.utils.cpp_extension import CUDAExtension

    include_dirs = [os.path.join(here, CSRC)]
    # torch's headers include CUDA library headers (cusparse.h, ...) that a bare toolkit may lack;
    # the nvidia-* wheels torch depends on carry them.
    try:
        import nvidia
        include_dirs += [os.path.join(p, "cu13", "include") for p in nvidia.__path__
                         if os.path.isdir(os.path.join(p, "cu13", "include"))]
    except ImportError:
        pass
    std = ["-O3", "-std=c++20"] + _limits().cpp_defines()   # the shared constants (kernels/limits.py)
    return [CUDAExtension("vidkern._C", CUDA_SOURCES, include_dirs=include_dirs,
                          extra_compile_args={"cxx": std, "nvcc": std + ["--expt-relaxed-constexpr", "-lineinfo"]})]


ext_modules = cuda_extensions()
cmdclass = {}
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension
    cmdclass["build_ext"] = BuildExtension

setup(
    name="vidkern",
    version=version["__version__"],
    description="Fused GPU kernels for video transformers: FAR sparse-dense attention, TEAM, STTM",
    long_description=open(os.path.join(here, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    keywords=["pytorch", "triton", "cuda", "attention", "video transformer", "token merging"],
    python_requires=">=3.10",
    packages=["vidkern", "vidkern.backends", "vidkern.nn", "vidkern.work", "vidkern.kernels"],
    package_dir={"vidkern.kernels": "kernels"},
    # PEP 561: the package ships its type hints; the work model reads the compiled kernels' SASS table
    package_data={"vidkern": ["py.typed"], "vidkern.work": ["sass_sm90.json"]},
    # The supported range (README "Supported versions"); `make test` pins the newest
    # (constraints.txt), CI's compatibility leg the oldest this machine can install
    # (constraints-compat.txt). Only what vidkern itself imports.
    install_requires=["torch>=2.11", "triton>=3.6; platform_system == 'Linux'"],
    extras_require={
        # numpy: Triton's interpreter (the kernel tests without a GPU) runs on it.
        # timm: the HSDAttention.from_attention tests on timm's Attention and VisionTransformer
        # (it needs torchvision, pinned in constraints.txt to the release built for the pinned torch).
        "test": ["pytest>=8", "hypothesis", "ninja", "numpy", "timm"],
        "bench": ["pytest>=8", "pytest-benchmark", "matplotlib"],
        "hf": ["transformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
