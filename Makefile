# The README's two commands. Each creates or updates .venv from pyproject.toml, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean tritonserver-wheel

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(MAKE) --no-print-directory tritonserver-wheel
	touch $(STAMP)

# The tritonserver wheel (nvidia-pytriton, Linux only) goes in only where pip itself finds a
# wheel for this platform: a dry run of the install answers, and its answer decides (macOS
# laptops driving GKE get the client side: cluster, job submission, evaluation against a remote
# Triton). PIP_PLATFORM_FLAGS asks pip about another platform instead and installs nothing
# (tests/test_makefile.py). --no-deps: the wheel's metadata pins numpy<2 for pytriton's own
# Python API, which this project never imports (pyproject.toml, [tool.t5x-ft-ray]).
PIP_PLATFORM_FLAGS ?=
tritonserver-wheel:
	@wheel="$$($(PY) -c 'import tomllib; \
		print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["t5x-ft-ray"]["tritonserver-wheel"])')"; \
	if answer="$$($(PY) -m pip install --dry-run --no-deps --only-binary=:all: --ignore-installed \
			--quiet $(PIP_PLATFORM_FLAGS) "$$wheel" 2>&1)"; then \
		if [ -n "$(PIP_PLATFORM_FLAGS)" ]; then echo "tritonserver: pip has $$wheel for $(PIP_PLATFORM_FLAGS)"; \
		else $(PY) -m pip install -q --no-deps "$$wheel" && echo "tritonserver: installed $$wheel"; fi; \
	else \
		echo "tritonserver: skipped $$wheel: pip has no wheel for this platform ($$(printf '%s\n' "$$answer" | grep ERROR | tail -n 1)); local serving and its tests need Linux, the client side works without it"; \
	fi

demo: $(STAMP)
	$(PY) -m ray_jobs.pipeline --demo --json

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .demo-cache
