# Set-up commands for a fresh machine (see README.md).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install run test lint bench

install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"

run: install
	fimntk demo

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -p no:cacheprovider

lint:
	$(PYTHON) -m ruff check .

bench: install
	$(PIP) install --quiet -e ".[bench]"
	$(PIP) install --quiet --no-deps nngeometry==0.4 backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1
	$(PIP) install --quiet einops einconv unfoldNd opt_einsum linear-operator
	$(PYTHON) -m bench.core
	$(PYTHON) -m bench.representations
	$(PYTHON) -m bench.accuracy
