# `make test` / `make bench`: create .venv if missing, install vidkern with its extras (torch and
# triton pinned in constraints.txt) and build its CUDA extension where a CUDA toolkit is found,
# then run the suite / the benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Parallel nvcc jobs for the CUDA extension (read by torch's BuildExtension).
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: install test bench clean

# torch must be installed before vidkern's build runs (setup.py compiles against it), so the
# build-time packages come first and vidkern installs without build isolation.
$(VENV)/.installed: setup.py pyproject.toml constraints.txt $(wildcard csrc/*.cu csrc/*.h csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch triton setuptools wheel ninja
	$(PY) -m pip install --quiet -c constraints.txt --no-build-isolation -e ".[test,bench,hf]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest benchmarks $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks vidkern/_C*.so
