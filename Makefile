# `make test` / `make bench`: create .venv if missing, install vidkern with its extras (every
# distribution at the exact version of the lock, constraints.txt) and build its CUDA extension where
# a CUDA toolkit is found, then run the suite / the benchmarks. `make lock` refreshes the lock.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Parallel nvcc jobs for the CUDA extension (read by torch's BuildExtension).
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: install test bench gpu-check dist compat lock lock-compat mutants clean

# What the environments hold besides vidkern's extras: build-time packages (and `build`, for `make dist`).
BUILD_REQS := torch triton setuptools wheel ninja build
COMPAT_REQS := torch triton numpy setuptools wheel pytest hypothesis

# torch must be installed before vidkern's build runs (setup.py compiles against it), so the
# build-time packages come first and vidkern installs without build isolation.
$(VENV)/.installed: setup.py pyproject.toml constraints.txt $(wildcard csrc/*.cu csrc/*.h csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt $(BUILD_REQS)
	$(PY) -m pip install --quiet -c constraints.txt --no-build-isolation -e ".[test,bench,hf]"
	$(PY) .ci/lock.py check constraints.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest benchmarks $(PYTEST_ARGS)

# An sdist and a wheel built *from that sdist* (so the sdist must hold every source the CUDA build
# needs), into dist/; the wheel must hold the extension and vidkern.kernels, no top-level kernels.
dist: install
	rm -rf dist
	$(PY) -m build --sdist --no-isolation --outdir dist .
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist dist/vidkern-*.tar.gz
	$(PY) .ci/check_dist.py dist

# The compatibility leg: the oldest supported torch/triton (constraints-compat.txt) in a clean venv,
# vidkern installed from the sdist; the Triton AOT check for sm_80/sm_90 and the interpreter and
# CPU tests, run from outside the source tree against the installed package.
# Left out there: the build and CUDA-resource tests (no CUDA torch), and those that run the source
# tree itself in a subprocess (examples, benchmark harness, gpucheck), which the main leg covers.
COMPAT_IGNORE := test_build.py test_aot.py test_examples.py test_benchmarks_smoke.py test_gpucheck.py
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
compat: dist
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet -c constraints-compat.txt $(COMPAT_REQS)
	$(COMPAT_PY) -m pip install --quiet --force-reinstall --no-deps --no-build-isolation dist/vidkern-*.tar.gz
	$(COMPAT_PY) .ci/lock.py check constraints-compat.txt
	cd $(COMPAT_VENV) && ./bin/python -m vidkern.info && ./bin/python -m vidkern.aot
	cd $(COMPAT_VENV) && ./bin/python -m pytest $(CURDIR)/tests -p no:cacheprovider -q -ra \
		-m "not slow" $(foreach t,$(COMPAT_IGNORE),--ignore=$(CURDIR)/tests/$(t)) $(COMPAT_PYTEST_ARGS)

# On a GPU machine with torch/triton/nvcc preinstalled and no network: no virtualenv, the system
# Python; builds vidkern._C for the local arch, runs the kernel tests, sanitizers and benchmarks
# within a budget, and writes at most 8 files into OUT (python -m vidkern.gpucheck --help).
OUT ?= gpu-check-out
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m vidkern.gpucheck --out $(OUT) $(GPUCHECK_ARGS)

# Refresh a lock: a fresh venv resolved from the unpinned requirements (only the versions the lock's
# header names stay fixed: TOP_PINS), then every installed version written back. Review the diff.
TOP_PINS := torch==2.14.1 triton==3.8.0 torchvision==0.29.1
COMPAT_TOP_PINS := torch==2.13.0 triton==3.6.0 "numpy<2.4"
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet $(TOP_PINS) $(filter-out torch triton,$(BUILD_REQS))
	VIDKERN_SKIP_CUDA_BUILD=1 .venv-lock/bin/pip install --quiet --no-build-isolation ".[test,bench,hf]"
	.venv-lock/bin/python .ci/lock.py write constraints.txt && rm -rf .venv-lock

lock-compat:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet $(COMPAT_TOP_PINS) $(filter-out torch triton numpy,$(COMPAT_REQS))
	.venv-lock/bin/python .ci/lock.py write constraints-compat.txt && rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .venv-lock build dist *.egg-info .pytest_cache .benchmarks vidkern/_C*.so

# Mutation testing (.ci/mutants.py): plants each listed bug alone in a copy of the tree and runs
# the tests that should catch it; exits 1 on a survivor. Not part of CI (minutes per mutant).
mutants: install
	$(PY) .ci/mutants.py $(MUTANTS)
