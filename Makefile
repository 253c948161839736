# The two commands of the Quick start. Each creates (or reuses) .venv in the checkout and
# reinstalls the package when setup.py changes. The tpu extra (libtpu) lets the tests compile for TPU
# slices ahead of time; JAX itself runs on the CPU here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: test demo install clean

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,tpu]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m lima_jax.demo

clean:
	rm -rf $(VENV) demo *.egg-info
