# work-sidecar: `make run` shows the whole flow on an embedded Work API emulator; `make test` runs every check.
# Both create the virtualenv they need (.venv) on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# One stamp per install set, so each target installs only what it needs: `make run` the sidecar (pyproject extra
# `server`) and the demo's grpcurl (`demo`), `make test` adds the `test` extra (and `bench`: the suite runs the
# bench's smoke test), `make bench` adds the `bench` extra. tests/test_install_sets.py checks these sets.
RUN_STAMP   := $(VENV)/.installed-run
TEST_STAMP  := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
PIP         := $(BIN)/python -m pip install --quiet --disable-pip-version-check
export PATH := $(CURDIR)/$(BIN):$(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: help venv proto config-docs lint typecheck buf-lint test test-bench test-fast run bench bench-quick chaos chaos-quick polyglot-deps clean
.PHONY: monitoring-deps telemetry-docs image image-test

help:
	@echo "make run            start the sidecar on an embedded emulator and run the example sandbox"
	@echo "make test           ruff, mypy --strict, buf lint, the stale-code check and the whole pytest suite"
	@echo "make proto          regenerate sidecar/work/ from proto/"
	@echo "make config-docs    regenerate docs/configuration.md from the flag definitions"
	@echo "make bench          benchmarks against the official SDK worker, then the fleet (writes bench/results/)"
	@echo "make chaos          the slow attack tests, then the chaos and fuzz matrix, >= 10 min (writes chaos/results/)"
	@echo "make polyglot-deps  install Node, Go and buf for the polyglot examples and buf lint (apt-get: needs root)"
	@echo "make monitoring-deps install Prometheus and promtool for the deploy/monitoring test (apt-get: needs root)"
	@echo "make telemetry-docs regenerate docs/telemetry.md from the instrument declarations"
	@echo "make image          build the Dockerfile (podman, or docker) as \$$(IMAGE) ($(IMAGE))"
	@echo "make image-test     build it, then run it as docker run does and as every shipped manifest does"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	@echo "==> installing work-sidecar (the sidecar and the demo's grpcurl) into $(VENV)"
	$(PIP) --no-compile -e '.[server,demo]'  # no byte-compiling of every package up front: imports compile what they use
	@touch $@

$(TEST_STAMP): pyproject.toml $(RUN_STAMP)
	@echo "==> adding the test tools (and the benchmark's, for its smoke test) to $(VENV)"
	$(PIP) -e '.[server,demo,test,bench]'
	@touch $@

$(BENCH_STAMP): pyproject.toml $(RUN_STAMP)
	@echo "==> adding the benchmark tools to $(VENV)"
	$(PIP) -e '.[server,demo,bench]'
	@touch $@

venv: $(RUN_STAMP)

proto: $(TEST_STAMP)
	$(BIN)/python tools/gen_proto.py

# docs/configuration.md from the flag definitions; tests/test_config_docs.py fails when it is stale.
config-docs: $(RUN_STAMP)
	$(BIN)/python tools/gen_config_docs.py

LINT_PATHS := $(wildcard sidecar tests tools examples bench chaos)

lint: $(TEST_STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(TEST_STAMP)
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

# Four workers on two cores: the suite mostly waits on real processes (timeouts, TTLs, child start-ups), so two
# workers leave the cores more than half idle. The `slow` tests (long attacks, and the bench's smoke and fleet runs,
# minutes of real processes each) run with `make chaos` instead, so `make test` stays within 10 minutes;
# `make test-bench` runs the bench's on two workers (they measure), and .ci/run calls it after `make test`.
PYTEST_WORKERS ?= 4
test: lint typecheck buf-lint $(TEST_STAMP)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not slow"

test-bench: $(TEST_STAMP)
	$(BIN)/pytest -n 2 -m slow tests/bench

test-fast: $(TEST_STAMP)
	$(BIN)/pytest -x -q -m "not polyglot"

run: $(RUN_STAMP)
	$(BIN)/python examples/python/demo.py

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench
	$(BIN)/python -m bench --fleet

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench --quick

# The scenario matrix against the emulator behind a fault proxy, then gRPC fuzzing; the table goes to chaos/results/.
chaos: $(TEST_STAMP)
	$(BIN)/pytest -m slow
	$(BIN)/python -m chaos

chaos-quick: $(TEST_STAMP)
	$(BIN)/python -m chaos --quick

polyglot-deps:
	bash tools/install-polyglot-deps.sh

# Debian's prometheus package (prometheus and promtool): tests/deploy/test_monitoring.py runs them, and skips
# with the reason when they are missing.
monitoring-deps:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then \
	  echo "==> prometheus and promtool are installed"; \
	else DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; fi

telemetry-docs: $(TEST_STAMP)
	$(BIN)/python tools/gen_telemetry_docs.py
# The image, built from the Dockerfile unchanged (deploy/image/build.sh: podman with runc, or docker; a stand-in
# for the base image from this machine's Debian sources when no registry answers), then run by tests/deploy/test_image.py
# as `docker run` runs it and as each shipped manifest runs its sidecar container. Not part of `make test`.
IMAGE ?= work-sidecar:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image:
	bash deploy/image/build.sh $(IMAGE)

image-test: image $(TEST_STAMP)
	. deploy/image/container-tool.sh && WORK_SIDECAR_IMAGE=$(IMAGE) $(BIN)/pytest -p no:randomly -n 0 -v tests/deploy/test_image.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache node_modules examples/node/node_modules
