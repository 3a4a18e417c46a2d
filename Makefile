# Two commands do all the set-up:  `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Generate the sample dataset, train the real CSPResNet-50 on it, validate the best checkpoint.
demo: $(VENV)/installed
	$(PY) -m data.sample_data --out sample_imagenet
	$(PY) train.py --recipe demo.yaml --output runs/demo --resume auto
	$(PY) validate.py --checkpoint runs/demo/best.pt --data-dir sample_imagenet --workers 2

test: $(VENV)/installed
	$(PY) -m pytest -q tests

clean:
	rm -rf runs/demo sample_imagenet
