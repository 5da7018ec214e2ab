# Set-up commands for a fresh machine (see README.md). Installs come from the lock files in
# requirements/ (exact versions, what CI tested); pyproject.toml keeps the version ranges.
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check
LATEST_VENV := .venv-latest
COMPILE := $(PYTHON) -m piptools compile --quiet --strip-extras --no-emit-index-url \
	--no-emit-find-links --unsafe-package torch -c requirements/torch.txt pyproject.toml

.PHONY: browser install install-server run test test-api test-latest lint typecheck lock bench

# The test and development environment: server, dev tools, this checkout in editable mode.
install:
	$(PIP) install --quiet -r requirements/torch.txt
	$(PIP) install --quiet -r requirements/test.txt
	$(PIP) install --quiet --no-deps -e .

# What a GPU box runs: the engine, the client, the API and the worker stack.
install-server:
	$(PIP) install --quiet -r requirements/torch.txt
	$(PIP) install --quiet -r requirements/server.txt
	$(PIP) install --quiet --no-deps -e .

run: install-server
	$(PYTHON) -m fimntk demo

test: install browser
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -q -p no:cacheprovider

# The fast lane: the API's tests on an in-process queue (fakeredis), no server to start.
test-api:
	FIMNTK_TEST_REDIS=fakeredis $(PYTHON) -m pytest -q -p no:cacheprovider tests/service \
		-m "not slow"

typecheck:
	$(PYTHON) -m mypy

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# The newest releases pyproject.toml allows (torch stays at the tested release), in a venv of
# their own: drift shows here before it reaches the locks.
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet -r requirements/torch.txt
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
		-e ".[server,dev]"
	$(LATEST_VENV)/bin/python -m ruff check .
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider

# Re-resolve the locks (test first; the others agree with it on every shared package).
lock:
	$(PIP) install --quiet pip-tools
	$(COMPILE) --extra server --extra dev -o requirements/test.txt
	$(COMPILE) --extra server -c requirements/test.txt -o requirements/server.txt
	$(COMPILE) --extra server --extra bench -c requirements/test.txt -o requirements/bench.txt

bench: install
	$(PIP) install --quiet -r requirements/bench.txt
	$(PIP) install --quiet --no-deps nngeometry==0.4 backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1
	$(PIP) install --quiet einops einconv unfoldNd opt_einsum linear-operator
	$(PYTHON) -m bench.core
	$(PYTHON) -m bench.representations
	$(PYTHON) -m bench.accuracy

# The dashboard's tests drive Debian's chromium (Playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; } \
		|| echo "make: install Debian's chromium for tests/service/test_ui.py"
