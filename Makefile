# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: run test lint pytest smoke install system-deps bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

## make run: the proxy on the embedded default (memory store, demo policy, demo upstream)
run: install
	$(PY) examples/demo/run.py

## make test: lint, types, the whole test suite, and the public contract smoke test
test: install system-deps lint pytest smoke

pytest: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench
	$(VENV)/bin/mypy

smoke: install
	@if [ -f $(SHARED)/smoke/contract_smoke.py ]; then \
		$(PY) $(SHARED)/smoke/contract_smoke.py $(VENV)/bin/agentproxy; \
	else echo "smoke: $(SHARED)/smoke/contract_smoke.py not found; skipped (it lives beside the repo)"; fi

## make bench: overhead against a direct call, as ratios from the same run (not part of test)
bench: install
	@command -v wrk >/dev/null 2>&1 || { echo "wrk is missing: apt-get install wrk"; exit 1; }
	$(PY) bench/http_overhead.py
	$(PY) bench/decision_store.py

# promtool (Debian package "prometheus") checks our /metrics exposition in the tests.
system-deps:
	@command -v promtool >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
		else echo "promtool is missing: install Debian's prometheus package (sudo apt-get install prometheus)"; exit 1; fi; }

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
