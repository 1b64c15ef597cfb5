# The two commands a newcomer types: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TOOLS := .tools
CONFIG ?= tap.cfg
# Test processes: most tests wait on sockets and subprocesses, so more processes than cores pay (0: one process).
TEST_PROCESSES ?= 4

.PHONY: run test test-bench test-deploy typecheck check clean fuzz bench bench-quick bench-workers conformance conformance-quick soak soak-quick screenshots test-js

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# An editable install in "compat" mode keeps twisted/plugins/ visible to twistd.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]' --config-settings editable_mode=compat
	touch $@

# wscat is the client the README's tour uses; the end-to-end tests use it too.
$(TOOLS)/node_modules/.bin/wscat:
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) wscat@6

run: $(VENV)/.installed-run
	$(BIN)/twistd -n --pidfile= wsgateway --config $(CONFIG)

# socket.io's server and client: the tests check the gateway is transparent in front of them.
$(TOOLS)/node_modules/socket.io-client:
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) socket.io@4 socket.io-client@4

# oidc-provider: the OpenID provider the identity provider tests run (tests/oidc, pinned by its lockfile).
tests/oidc/node_modules/.package-lock.json: tests/oidc/package.json tests/oidc/package-lock.json
	npm ci --silent --no-audit --no-fund --prefix tests/oidc

# Bytecode caches on even where PYTHONDONTWRITEBYTECODE is set: without them every test process
# rewrites and compiles the tests again (about 4 CPU-s each) and every twistd the tests start
# compiles the package (about 0.25 CPU-s each).
test: $(VENV)/.installed-test $(TOOLS)/node_modules/.bin/wscat $(TOOLS)/node_modules/socket.io-client $(TOOLS)/node_modules/playwright-core tests/oidc/node_modules/.package-lock.json
	@if [ -z "$(PYTEST_ARGS)" ]; then $(MAKE) --no-print-directory typecheck; fi
	PATH="$(CURDIR)/$(TOOLS)/node_modules/.bin:$$PATH" env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest --ignore=tests/deploy -m "not bench" -n $(TEST_PROCESSES) --dist worksteal $(PYTEST_ARGS)
	@if [ -z "$(PYTEST_ARGS)" ]; then $(MAKE) --no-print-directory test-js; fi

# The benchmarks' machinery (bench/run.py through every figure, bench/workers.py --smoke: about a minute); `make test` runs one figure of run.py.
test-bench: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m bench tests/test_bench_quick.py tests/test_bench_workers.py $(PYTEST_ARGS)

# The browser client's reconnect rules (wsgateway-client.js), in Node's own test runner.
test-js:
	node --test tests/js/

# The relay's fast path against Autobahn's parsing, long (FUZZ_EXAMPLES, default 20000).
fuzz: $(VENV)/.installed-test
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/test_relay_differential.py $(PYTEST_ARGS)

# A rolling restart behind HAProxy (Debian's haproxy package) under load.
test-deploy: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/deploy $(PYTEST_ARGS)

# mypy --strict over the package ([tool.mypy] in pyproject.toml lists the few exceptions);
# a whole `make test` runs it first (a few seconds).
typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

check: $(VENV)/.installed-run
	$(BIN)/twistd wsgateway --config $(CONFIG) --check

# Autobahn|Testsuite through the gateway, both directions (docs/conformance.md).
conformance: $(VENV)/.installed-run
	$(BIN)/python .ci/conformance.py

conformance-quick: $(VENV)/.installed-run
	$(BIN)/python .ci/conformance.py --quick

# CPU per unit of work and memory: the gateway vs nginx vs the seed's aiohttp design vs direct (docs/performance.md).
bench: $(VENV)/.installed-run $(VENV)/.installed-bench
	$(BIN)/python bench/run.py

bench-quick: $(VENV)/.installed-run $(VENV)/.installed-bench
	$(BIN)/python bench/run.py --quick

# workers = 2 against workers = 1 (CPU per unit), the spread over two workers, SIGHUP under load (docs/performance.md).
bench-workers: $(VENV)/.installed-run
	$(BIN)/python bench/workers.py

# A real twistd under load and a seeded storm of faults; fails on a leak or a wrong outcome (docs/soak.md).
soak: $(VENV)/.installed-run
	$(BIN)/python bench/soak.py

soak-quick: $(VENV)/.installed-run
	$(BIN)/python bench/soak.py --quick

# The pictures in docs/, taken in headless Chromium by the browser tests.
# playwright-core drives Debian's chromium in the demo page's browser test (no browser download).
$(TOOLS)/node_modules/playwright-core:
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) playwright-core@1

screenshots: $(VENV)/.installed-test $(TOOLS)/node_modules/playwright-core
	WSGATEWAY_SCREENSHOTS=$(CURDIR)/docs $(BIN)/python -m pytest tests/browser $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info twisted/plugins/dropin.cache
