# The README's two commands. Each creates or updates .venv from pyproject.toml, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# tritonserver's wheel goes in with --no-deps: its metadata pins numpy<2 for pytriton's own Python
# API, which this project never imports (pyproject.toml, [tool.t5x-ft-ray]).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$$($(PY) -c 'import tomllib; \
		print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["t5x-ft-ray"]["tritonserver-wheel"])')"
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
