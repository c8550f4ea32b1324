# Two commands on a fresh machine:  make demo   /   make test
# Each creates .venv, installs torch==2.13.0 first (a CPU wheel; never a multi-GB CUDA
# build), then rotfn with its test and demo extras. Re-runs skip the install unless pyproject.toml changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rotfn-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,demo,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m rotfn demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/cpu.py

clean:
	rm -rf $(VENV) .hypothesis
