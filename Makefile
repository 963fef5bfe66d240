# fedlora: `make run` runs the built-in default experiment, `make test` runs the test suite.
# Both create .venv first (torch==2.13.0 CPU is installed before anything else so pip never pulls CUDA).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
export HF_HUB_OFFLINE := 1

.PHONY: install dev models run test lint bench clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	touch $@

dev: $(VENV)/.dev
$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

models: install
	$(VENV)/bin/fedlora fetch smollm2-135m-instruct

run: models
	$(VENV)/bin/fedlora run $(ARGS)

test: dev
	$(VENV)/bin/fedlora fetch smollm2-135m-instruct all-minilm-l6-v2 benchmarks
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: dev
	$(VENV)/bin/ruff check fedlora tests benchmarks examples
	$(VENV)/bin/ruff format --check fedlora tests benchmarks examples
	$(VENV)/bin/mypy  # fedlora/ ([tool.mypy] in pyproject.toml)

bench: install
	$(PY) benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
