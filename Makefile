# Two commands for a fresh machine:  make render PROMPT="a red ball falling"  and  make test.
# Each target sets itself up: a .venv beside this file, torch first (the CPU build where there is
# no CUDA), then cineray with a constraints file that pins that torch so nothing swaps it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROMPT ?= a red ball falling and bouncing
ARGS   ?=
STAMP  := $(VENV)/.cineray-installed

.PHONY: setup system render test test-fast bench lint clean kuberay

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==2.13.0; fi; fi
	@$(PY) -c "import torch; print(f'torch=={torch.__version__.split(\"+\")[0]}')" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	@touch $(STAMP)

# System packages the tests drive: Debian's Chromium (the playground's browser test; never a
# downloaded browser) and iproute2 (network namespaces for the multi-node test).
SYSTEM_PKGS := chromium chromium-driver iproute2
system:
	@if ! command -v chromium >/dev/null || ! command -v ip >/dev/null; then \
	  if ! command -v apt-get >/dev/null; then \
	    echo "install Chromium and iproute2 with your package manager ($(SYSTEM_PKGS))"; exit 1; fi; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(SYSTEM_PKGS); fi

render: $(STAMP)
	$(VENV)/bin/cineray render "$(PROMPT)" $(ARGS)

test: $(STAMP) system
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# infra/kuberay/rayservice.yaml from infra/serve/gpu.yaml + infra/kuberay/raycluster.yaml
kuberay:
	$(PYTHON) infra/kuberay/render.py

clean:
	rm -rf $(VENV) cineray-data .pytest_cache
