# Two commands do all set-up on a fresh machine:
#   make demo   - creates/reuses .venv, installs the lock and specbatch, pulls the demo model, runs jobs/demo.yaml
#   make test   - creates/reuses .venv, installs the lock and specbatch, runs the test suite
# Upgrades are a deliberate, tested step:
#   make lock         - re-resolves requirements/lock.txt from pyproject.toml (uv pip compile)
#   make test-latest  - the suite in .venv-latest against the newest releases pyproject.toml admits
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
# torch is installed first and pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export PY TORCH_SPEC
export RAY_AUTH_MODE ?= disabled
# The lock is resolved for this platform: CPU Linux, x86_64, CPython 3.11.
LOCK_PLATFORM ?= x86_64-manylinux_2_28
LOCK_PYTHON ?= 3.11
UV_VERSION ?= 0.13.9

.PHONY: venv demo test test-latest lock bench clean

$(BIN)/.installed: pyproject.toml requirements/lock.txt Makefile scripts/venv.sh
	@scripts/venv.sh $(VENV) lock
	@touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/specbatch demo

test: venv
	$(BIN)/python -m pytest -q -ra tests

test-latest:
	@scripts/venv.sh $(LATEST) latest
	$(LATEST)/bin/python -m pip list --format=freeze > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q -ra tests

lock: venv
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	scripts/lock.sh $(BIN)/uv $(LOCK_PYTHON) $(LOCK_PLATFORM)

bench: venv
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) $(LATEST) out
