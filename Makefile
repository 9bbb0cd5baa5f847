# The two set-up commands of the README:
#   make demo   # creates .venv, then runs the main job on the embedded default
#   make test   # creates .venv, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo

.PHONY: demo test venv clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m gripjax.main --config=configs/gripbench_dense.py --mode=demo --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) workdir
