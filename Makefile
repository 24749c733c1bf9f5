# Set-up and checks. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The Triton server's own environment (numpy<2: requirements-triton.txt); the tests find it
# through RMT_TRITON_VENV.
TRITON_VENV ?= .venv-triton

.PHONY: test demo demo-armt check-aarch64 clean

$(VENV)/.installed: setup.py requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(TRITON_VENV)/.installed: setup.py requirements-triton.txt
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-triton.txt
	touch $@

## test: create the venvs (.venv: the project with its test extras, numpy 2; .venv-triton: the
## Triton server of the live Triton tests, numpy<2), run the whole suite from .venv
## (one pytest worker per core; the workers share one cache of exported test bundles)
test: $(VENV)/.installed $(TRITON_VENV)/.installed
	RMT_TRITON_VENV=$(abspath $(TRITON_VENV)) $(PY) -m pytest -q -n auto --dist worksteal

## check-aarch64: the built wheel on arm64 (Debian root under qemu-user; needs root; ~5 min cold, ~1 min cached)
check-aarch64: $(VENV)/.installed
	scripts/check_aarch64.sh

## demo: the main job on the sample model
demo: $(VENV)/.installed
	$(PY) samples/demo.py

## demo-armt: the same job on the ARMT sample, over 64 segments
demo-armt: $(VENV)/.installed
	$(PY) samples/demo.py --checkpoint samples/keyrecall_armt/model.pt --segments 64 --out out/demo-armt

clean:
	rm -rf $(VENV) $(TRITON_VENV) build *.egg-info .pytest_cache
