# mailshim: `make demo` and `make test` do everything on a fresh machine.
PYTHON ?= $(shell command -v /usr/bin/python3 || command -v python3)
VENV ?= .venv
BIN = $(VENV)/bin
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: venv demo test tools lint typecheck unit compat fuzz bench bench-postfix bench-spooling bench-scale dist \
	crash-states \
	pypi-check clean soak \
	real-listeners

# One venv, filled in steps: each stamp says what is installed, so `make demo` needs only
# the package and its sink, and `make test` adds the test and lint tools.
venv: $(VENV)/.stamp-test

$(VENV)/.stamp-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	rm -f $(VENV)/.stamp-sink $(VENV)/.stamp-test
	touch $@

$(VENV)/.stamp-sink: $(VENV)/.stamp-base
	$(BIN)/pip install -q -e '.[sink]'
	touch $@

# atheris has no wheel for every platform (aarch64) and needs clang's libFuzzer to build:
# without it `make fuzz` runs the same targets under hypothesis (tests/test_fuzz.py).
$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(BIN)/pip install -q -e '.[test,sink,dev]'
	@$(BIN)/pip install -q -e '.[fuzz]' >$(VENV)/atheris.log 2>&1 \
	    || echo "atheris cannot be installed on $$(uname -m) (see $(VENV)/atheris.log):" \
	        "make fuzz runs the fuzz targets under hypothesis instead"
	touch $@

demo: $(VENV)/.stamp-sink
	VENV=$(VENV) bash scripts/demo.sh

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: venv
	$(BIN)/mypy src

unit: venv
	$(BIN)/pytest

# unit last: its pytest summary is the closing line CI reads; the test tools and the real
# listeners are installed before compat and unit run their tests.
test: tools lint typecheck fuzz real-listeners compat unit

# Dovecot LMTP (apt) and Haraka (npm, into ~/.cache/mailshim-tests) for
# tests/test_real_listeners.py; a no-op when they are there.
real-listeners:
	bash tests/real-listeners/install.sh

# The programs some tests drive (the tests skip without them; README "Tests" says which):
# installed with apt when we are root and apt-get exists, quietly; otherwise listed.
TEST_TOOLS = swaks:swaks php:php-cli zsh:zsh fish:fish mandoc:mandoc strace:strace
APT_QUIET = DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
tools:
	@missing=""; for t in $(TEST_TOOLS); do \
	    command -v "$${t%%:*}" >/dev/null || missing="$$missing $${t#*:}"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing the test tools:$$missing"; \
	    $(APT_QUIET) $$missing >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 && $(APT_QUIET) $$missing >/dev/null 2>&1; } \
	    || echo "could not install$$missing: the tests needing them are skipped"; \
	else \
	    echo "not installed:$$missing: the tests needing them are skipped" \
	        "(as root with apt-get, make test installs them)"; \
	fi

# Each atheris target for a bounded time over the committed corpus (tests/fuzz/corpus);
# where atheris is missing, the same targets under hypothesis, and the corpus replayed.
fuzz: venv
	@if $(BIN)/python -c 'import atheris' 2>/dev/null; then \
	    sh tests/fuzz/run.sh -t $${FUZZ_SECONDS:-10}; \
	else \
	    echo "fuzz: no atheris here: running the fuzz targets under hypothesis instead"; \
	    $(BIN)/pytest -q -p no:cacheprovider tests/test_fuzz.py; \
	fi

# Issue 27: every power-cut state of every spool workload, recovered and checked (CI checks a
# sample of each); as root, with strace. CRASH_REPORT=FILE appends the figures as JSON lines.
crash-states: venv
	MAILSHIM_CRASH_STATES=all MAILSHIM_CRASH_REPORT=$${CRASH_REPORT:-} \
	    $(BIN)/pytest -q -p no:cacheprovider tests/test_crash_states.py

compat: venv
	bash tests/compat/run-bookworm.sh

# PyPI: the sdist and the wheel, checked by twine (long description, metadata).
DIST_FILES = dist/mailshim-$(VERSION).tar.gz dist/mailshim-$(VERSION)-py3-none-any.whl
dist: $(VENV)/.stamp-base
	$(BIN)/pip install -q build twine
	rm -f $(DIST_FILES)
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict $(DIST_FILES)

# What a pipx user gets: the wheel in a clean pipx home, `mailshim check`, a sink round trip.
pypi-check: dist
	bash .ci/pypi-check.sh dist/mailshim-$(VERSION)-py3-none-any.whl

bench: venv
	$(BIN)/python bench/run.py

# Opt-in, as root: mailshim and a throwaway Postfix null client side by side on one listener
# (bench/postfix.py unpacks Debian's postfix package in a temp folder; nothing is installed).
bench-postfix: venv
	$(BIN)/python bench/run.py --only postfix

# Issue 26: every command at 1,000, 10,000 and 100,000 queued (spools on tmpfs), with peak
# RSS; Postfix's postqueue -p and postsuper beside it when run as root. ~15 minutes.
bench-scale: venv
	nice $(BIN)/python bench/scale.py $$( [ "$$(id -u)" = 0 ] && echo --postfix ) --out bench/scale-last.md

# Issue 14 item 3: background-mode submissions with the listener up and down (and queue
# mode, and the bare interpreter), interleaved; bench/spooling.py --help for the options.
bench-spooling: venv
	$(BIN)/python bench/spooling.py --installs debian,wheel-venv --cases up,down,queue,pass

# Issue 28: mutation testing of the pure modules, each mutated alone against its own test
# file (tests/mutation/run.py: score table, survivors as diffs). MODULES=argv,fair selects;
# MUTATION_ARGS=--check fails below tests/mutation/scores.json, --record rewrites it,
# --changed skips the modules whose code and tests are those the recorded score measured.
MUTMUT = mutmut==3.8.1
.PHONY: mutation
mutation: venv
	$(BIN)/pip install -q '$(MUTMUT)'
	nice -n 10 $(BIN)/python tests/mutation/run.py $(if $(MODULES),--modules $(MODULES)) \
	    --max-children $${MUTATION_CHILDREN:-2} $(MUTATION_ARGS)

# The model-based test (tests/model, issue 22) with fresh seeds for SOAK_SECONDS (default 600),
# or one seed again: make soak SEED=123 (a failing seed is printed as exactly that command).
# As root: it creates users. SOAK_STEPS: steps per seed (default 20).
SOAK_SECONDS ?= 600
soak: venv
	SOAK_SECONDS=$(SOAK_SECONDS) SEED=$(SEED) $(BIN)/pytest -q -s -p no:cacheprovider \
	    tests/model/test_model.py::test_soak

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

-include mk/packaging.mk
