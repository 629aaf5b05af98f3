# Two commands do all set-up on a fresh machine:
#   make demo   - creates/reuses .venv, installs specbatch, pulls the demo model, runs jobs/demo.yaml
#   make test   - creates/reuses .venv, installs specbatch[dev], runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export RAY_AUTH_MODE ?= disabled

.PHONY: venv demo test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/specbatch demo

test: venv
	$(BIN)/python -m pytest -q -ra tests

bench: venv
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) out
