# Set-up and checks. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo clean

$(VENV)/.installed: setup.py requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

## test: create the venv, install the project with its test extras, run the whole suite
## (one pytest worker per core; the workers share one cache of exported test bundles)
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist load

## demo: the main job on the sample model
demo: $(VENV)/.installed
	$(PY) samples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
