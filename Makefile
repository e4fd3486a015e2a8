# Two commands do all the set-up: `make demo` (the main job) and `make test` (the checks).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist): the tests mostly wait on the processes they start, so two
# workers halve the run on two cores. 0 runs them in this process.
TEST_WORKERS ?= 2

.PHONY: demo test lint typecheck unit venv clean

$(STAMP): pyproject.toml tickwire tickwire/core server feeds clients bench
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=strict
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/tickwire demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	scripts/validate-asyncapi.sh

typecheck: $(STAMP)
	$(BIN)/mypy -p tickwire
	$(BIN)/mypy tests

unit: $(STAMP)
	scripts/ensure-chromium.sh
	scripts/ensure-brokers.sh
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test: lint typecheck unit

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
