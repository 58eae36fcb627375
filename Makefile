# work-sidecar: `make run` shows the whole flow on an embedded Work API emulator; `make test` runs every check.
# Both create the virtualenv they need (.venv) on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: help venv proto lint typecheck buf-lint test test-fast run bench bench-quick chaos chaos-quick polyglot-deps clean

help:
	@echo "make run            start the sidecar on an embedded emulator and run the example sandbox"
	@echo "make test           ruff, mypy --strict, buf lint, the stale-code check and the whole pytest suite"
	@echo "make proto          regenerate sidecar/work/ from proto/"
	@echo "make bench          benchmarks against the official SDK worker (writes bench/results/)"
	@echo "make chaos          the chaos and fuzz matrix, >= 10 min (writes chaos/results/)"
	@echo "make polyglot-deps  install Node, Go and buf for the polyglot examples and buf lint"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> installing work-sidecar and its test tools into $(VENV)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $(STAMP)

venv: $(STAMP)

proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

LINT_PATHS := $(wildcard sidecar tests tools examples bench chaos)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/mypy

# buf lint + format; and, once a v* tag exists, buf breaking against the latest one (FILE rules, buf.yaml).
buf-lint:
	@if command -v buf >/dev/null 2>&1; then \
	  echo "==> buf lint" && buf lint && \
	  echo "==> buf format --diff --exit-code" && buf format --diff --exit-code && \
	  tag=$$(git tag --list 'v*' --sort=-version:refname 2>/dev/null | head -n 1) && \
	  if [ -n "$$tag" ]; then \
	    echo "==> buf breaking against $$tag"; buf breaking --against ".git#tag=$$tag,subdir=proto"; \
	  else echo "==> buf breaking skipped: no v* git tag to compare against yet"; fi; \
	elif [ -n "$$WORK_SIDECAR_REQUIRE_POLYGLOT" ]; then echo "buf is missing (run make polyglot-deps)"; exit 1; \
	else echo "==> buf lint skipped: buf is not installed (make polyglot-deps installs it)"; fi

test: lint typecheck buf-lint
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -x -q -m "not polyglot"

run: $(STAMP)
	$(BIN)/python examples/python/demo.py

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

# The scenario matrix against the emulator behind a fault proxy, then gRPC fuzzing; the table goes to chaos/results/.
chaos: $(STAMP)
	$(BIN)/python -m chaos

chaos-quick: $(STAMP)
	$(BIN)/python -m chaos --quick

polyglot-deps:
	bash tools/install-polyglot-deps.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache node_modules examples/node/node_modules
