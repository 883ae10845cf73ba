# The two commands of the README: `make mnist` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/mnist

.PHONY: setup mnist test test-fast clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Train the embedded MNIST default (~11 min on 2 CPU cores), then print the test bpd,
# write a grid of samples and score 1,000 samples (~5 CPU-min). Run it again to resume
# (or to re-evaluate).
mnist: setup
	$(PY) -m vdm_jax.main --config=configs/mnist.py --workdir=$(WORKDIR) --mode=train
	$(PY) -m vdm_jax.main --config=configs/mnist.py --workdir=$(WORKDIR) --mode=eval
	$(PY) -m vdm_jax.main --config=configs/mnist.py --workdir=$(WORKDIR) --mode=sample

# Every test, the slow end-to-end ones included (what CI runs).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

# Everything but the tests marked slow.
test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

clean:
	rm -rf $(VENV) workdirs *.egg-info
