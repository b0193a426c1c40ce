# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when it is missing and
# install what they need (the pinned torch stack comes from the local wheel cache when there is one).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

# The pinned torch pair (from the local wheel cache when there is one) and the tools of the in-place build
# (--no-build-isolation); everything else comes from pyproject.toml: the core dependencies and the extras
# [all] (plot, data, faiss, distributed) + [test].
PINS := torch==2.14.1 torchvision==0.29.1
STACK := $(PINS) numpy pybind11 "cmake>=3.18" ninja "setuptools>=77" wheel
EXTRAS ?= all,test

export HF_HUB_OFFLINE := 1

CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*.in csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install demo test test-all bench info clean

$(VENV)/.stack:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(STACK)
	touch $@

$(VENV)/.built: $(VENV)/.stack setup.py CMakeLists.txt pyproject.toml $(CSRC)
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]" $(PINS)
	touch $@

install: $(VENV)/.built

demo: install
	$(PY) -m vlmfast demo --out demo-output

test: install
	$(PY) -m pytest -m "not slow" -n 2 -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_calibration.py
	$(PY) benchmarks/bench_text.py

info: install
	$(PY) -m vlmfast.info

clean:
	rm -rf build *.egg-info vlmfast/_C*.so out .pytest_cache .hypothesis
