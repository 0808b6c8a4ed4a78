# The two commands a newcomer needs: `make quickstart` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps quickstart test bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(PY) -m jobs.quickstart --out runs/quickstart

# Debian packages that tests drive, as package:command: a real Prometheus (tests/test_e2e_cluster.py) and a
# headless Chromium (tests/test_serve_page.py). Installed when missing and running as root; else those tests skip.
SYSTEM_DEPS := prometheus:prometheus chromium:chromium chromium-driver:chromedriver

system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do \
	  command -v $${dep#*:} >/dev/null || missing="$$missing $${dep%%:*}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing; } \
	    || echo "could not install$$missing; the tests that need them skip"; \
	else echo "missing system packages:$$missing (apt-get install them as root); the tests that need them skip"; fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q --durations=25

bench: $(STAMP)
	$(PY) bench/sample_speed.py

# Every CUDA path and the GPU figures in one command of at most 8 minutes (bench/gpu_check.py). It installs nothing:
# a GPU machine may have no package registry, so it runs on .venv's Python where there is one, else on python3 with
# its own torch, importing this checkout through PYTHONPATH.
OUT ?= runs/gpu-check
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) bench/gpu_check.py --out $(OUT)

clean:
	rm -rf runs .pytest_cache
