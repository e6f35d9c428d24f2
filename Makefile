# Two commands on a fresh machine (Python 3.11, pip):
#   make demo   export the default cascade (tiny) to ONNX in artifacts/tiny
#   make test   run the test suite (what CI runs, through .ci/run)
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= torch,cpu,t5,tools,trt-rtx,test

.PHONY: demo test
demo: $(VENV)/.installed
	$(PY) export.py onnx --preset tiny --out artifacts/tiny

test: $(VENV)/.installed
	$(PY) -m pytest -q

# torch first, pinned: pip then takes the local CPU wheel instead of a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[$(EXTRAS)]'
	touch $@
