# The README's two commands. Each creates or updates .venv from pyproject.toml, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ray_jobs.pipeline --demo --json

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .demo-cache
