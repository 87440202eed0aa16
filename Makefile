# The two commands a newcomer needs: `make up` and `make test`. Everything else is a step they use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test test-unit install lint bench clean

up: install
	$(BIN)/promptq up

# Both rooms: tests/unit, then tests/stack (pyproject's testpaths).
test: install
	$(BIN)/pytest $(PYTEST_ARGS)

# The unit room alone: no process started, no server asked; seconds.
test-unit: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

install: $(STAMP)

# Re-install only when the dependency list changes; the package itself is editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) promptq.db .promptq
