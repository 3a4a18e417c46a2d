# Two commands do all the set-up:  `make demo` and `make test`.
# `make` alone installs .venv: the pinned requirements (runtime and test), then this project, editable.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test clean

install: $(VENV)/installed

$(VENV)/installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Generate the sample dataset, train the real CSPResNet-50 on it, validate the best checkpoint.
demo: $(VENV)/installed
	$(PY) -m data.sample_data --out sample_imagenet
	$(PY) train.py --recipe demo.yaml --output runs/demo --resume auto
	$(PY) validate.py --checkpoint runs/demo/best.pt --data-dir sample_imagenet --workers 2

# The whole suite; `$(PY) -m pytest -q tests -m 'not slow'` leaves out the subprocess runs.
test: $(VENV)/installed
	$(PY) -m pytest -q tests

clean:
	rm -rf runs/demo sample_imagenet
