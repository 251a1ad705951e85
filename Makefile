# mailshim: `make demo` and `make test` do everything on a fresh machine.
PYTHON ?= $(shell command -v /usr/bin/python3 || command -v python3)
VENV ?= .venv
BIN = $(VENV)/bin
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: venv demo test lint typecheck unit compat fuzz bench clean real-listeners

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,sink,dev,fuzz]'
	touch $@

demo: venv
	bash scripts/demo.sh

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: venv
	$(BIN)/mypy src

unit: venv
	$(BIN)/pytest

# unit last: its pytest summary is the closing line CI reads; the real listeners are
# installed before compat and unit run their tests.
test: lint typecheck fuzz real-listeners compat unit

# Dovecot LMTP (apt) and Haraka (npm, into ~/.cache/mailshim-tests) for
# tests/test_real_listeners.py; a no-op when they are there.
real-listeners:
	bash tests/real-listeners/install.sh

# Each atheris target for a bounded time over the committed corpus (tests/fuzz/corpus).
fuzz: venv
	sh tests/fuzz/run.sh -t $${FUZZ_SECONDS:-10}

compat: venv
	bash tests/compat/run-bookworm.sh

bench: venv
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

-include mk/packaging.mk
