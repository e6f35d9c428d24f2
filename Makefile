# Two commands on a fresh machine (Python 3.11, pip):
#   make demo   export the default cascade (tiny) to ONNX and render a 17-frame 512x896 mp4 with the runtime
#   make test   run the test suite (what CI runs, through .ci/run)
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= torch,cpu,t5,tools,trt-rtx,kernels,calibration,ray,test
# a caption of the world tiny is trained on (docs/reference.md); at most 31 bytes: what its byte-level text encoder reads
PROMPT ?= a red circle moving left

.PHONY: demo test gpu-check
demo: $(VENV)/.installed
	$(PY) export.py onnx --preset tiny --out artifacts/tiny
	$(PY) -m runtime generate --artifacts artifacts/tiny --prompt "$(PROMPT)" --out artifacts/tiny.mp4

test: $(VENV)/.installed
	$(PY) -m pytest -q

# On a CUDA machine whose python already has torch with CUDA and Triton: `make gpu-check PY=python3` (a few minutes on
# an H100/H200). The Triton window kernel against scaled_dot_product_attention at the t2v shapes, one FP16 forward of
# the full-size t2v denoisers (eager, Triton op, torch.compile), and the CUDA tests: tables, and gpu_check.json.
gpu-check:
	$(PY) -m benchmarks.gpu_check --out gpu_check.json

# torch first, pinned: pip then takes the local CPU wheel instead of a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[$(EXTRAS)]'
	touch $@
