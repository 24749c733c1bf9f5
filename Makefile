# Set-up and checks. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo check-aarch64 clean

$(VENV)/.installed: setup.py requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

## test: create the venv, install the project with its test extras, run the whole suite
## (one pytest worker per core; the workers share one cache of exported test bundles)
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist worksteal

## check-aarch64: the built wheel on arm64 (Debian root under qemu-user; needs root; ~5 min cold, ~1 min cached)
check-aarch64: $(VENV)/.installed
	scripts/check_aarch64.sh

## demo: the main job on the sample model
demo: $(VENV)/.installed
	$(PY) samples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
