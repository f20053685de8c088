# Two entry points that do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test test-fast lint install install-test clean proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/mixserve serve

# The linter first (ruff: format and lint, configured in pyproject.toml), then the suite.
lint: install-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Everything: the unit tier, then the integration tier (Ray, Serve, subprocesses, namespaced hosts).
test: install-test lint
	$(BIN)/python -m pytest -q tests

# The unit tier alone (no Ray, no subprocess): under 2 minutes on 2 cores.
test-fast: install-test
	$(BIN)/python -m pytest -q tests/unit

# The committed gRPC stubs, regenerated after an edit of the proto (grpcio-tools: a developer tool).
proto: install
	$(BIN)/pip install --quiet grpcio-tools
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. cluster/proto/mixserve.proto

clean:
	rm -rf $(VENV) .pytest_cache
