# Two commands on a fresh machine (Python 3.11, pip):
#   make demo   build the default cascade and print its summary
#   make test   run the test suite (what CI runs, through .ci/run)
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= torch,cpu,t5,test

.PHONY: demo test
demo: $(VENV)/.installed
	$(PY) export.py summary

test: $(VENV)/.installed
	$(PY) -m pytest -q

# torch first, pinned: pip then takes the local CPU wheel instead of a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[$(EXTRAS)]'
	touch $@
