# The two commands of the README: `make demo` runs it, `make test` tests it.
PYTHON ?= python3
# Test processes: the suite mostly waits on Dovecot, RabbitMQ and PostgreSQL, and every test has
# its own database, vhost and Dovecot, so tests run side by side (pytest-xdist); they mostly wait.
TEST_WORKERS ?= 4
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup deps test test-all lint demo bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

deps:
	scripts/setup-deps.sh

test: setup deps
	$(BIN)/ruff check shared services tests bench scripts devkit examples
	$(BIN)/mypy
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

test-all: setup deps
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal -m "slow or not slow"

demo: setup deps
	$(BIN)/python scripts/demo.py

bench: setup
	WITH_MBSYNC=1 scripts/setup-deps.sh
	$(BIN)/python bench/initial_sync.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo
