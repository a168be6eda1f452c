# The README's two commands: `make run` (demo against the embedded fake GitHub, or a real farm
# with CONFIG=...) and `make test` (lint, type check, the whole test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# libvirt-python builds from source against the libvirt C library: add the extra only where
# its headers are installed, so `make test` still works on a machine without libvirt.
EXTRAS ?= dev,docker$(shell pkg-config --exists libvirt 2>/dev/null && echo ,libvirt)
CONFIG ?=

.PHONY: venv wheelhouse test lint typecheck pytest run clean

# The stamp names the extras, so a venv made before the libvirt headers arrived is completed later.
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

# Wheels of everything `pip install 'outrunner[docker,app,metrics,testing]'` needs, and of the build backend
# (pyproject.toml's [build-system] requires), so that tests/test_install.py and the Containerfile
# test build and install outrunner with --no-index: the tests never reach a package index.
WHEELHOUSE := $(VENV)/wheelhouse
WHEELHOUSE_STAMP := $(VENV)/.wheelhouse
BUILD_REQUIRES = $$($(BIN)/python -c 'import tomllib; \
	print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"])')

$(WHEELHOUSE_STAMP): pyproject.toml | $(STAMP)
	rm -rf $(WHEELHOUSE)
	$(BIN)/python -m pip download --quiet --only-binary :all: --dest $(WHEELHOUSE) \
		".[docker,app,metrics,testing]" $(BUILD_REQUIRES)
	touch $@

wheelhouse: $(WHEELHOUSE_STAMP)

lint: venv
	$(BIN)/ruff check outrunner examples tests bench typings
	$(BIN)/ruff format --check outrunner examples tests bench typings

typecheck: venv
	$(BIN)/mypy --strict outrunner examples bench

pytest: venv wheelhouse
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

run: venv
	$(BIN)/python examples/run.py $(if $(CONFIG),--config $(CONFIG),--demo)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
