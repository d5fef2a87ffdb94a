# Sluice: every target installs what it needs on a fresh machine (Python venv, Kafka jars via
# Maven, MinIO via go install); downloads are cached under ~/.cache/sluice and .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TRAIN  := $(VENV)/.installed-train
PYTEST_ARGS ?=

.PHONY: help install demo test unit images lint typecheck bench up down clean chaos

help:
	@echo "make demo | test | unit | chaos | images | lint | typecheck | bench | up | down | clean"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,cpu]'
	touch $(STAMP)

# torch & co. (~4 GB): only the model-build tests (marker `tools`) and training need them.
$(TRAIN): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,cpu,train]'
	touch $(TRAIN)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sluice demo

test: $(TRAIN)
	bash infra/prometheus/install-promtool.sh
	bash infra/chromium/install.sh
	npm ci --prefix infra/k8s/validate --no-audit --no-fund --loglevel=error
	bash infra/tools/install.sh >/dev/null
	$(BIN)/python -m infra fetch --minio
	$(BIN)/pytest -v $(PYTEST_ARGS)

# The base install only: no torch, node or services (tests marked `tools` need those).
unit: $(STAMP)
	$(BIN)/pytest -v -m "not integration and not tools" $(PYTEST_ARGS)

# Refresh docs/img/ (the README's dashboard screenshot) from a live run; tests never write there.
images: $(STAMP)
	bash infra/chromium/install.sh
	$(BIN)/python -m infra fetch
	DOCS_IMG=docs/img $(BIN)/pytest -v tests/integration/test_dashboard.py $(PYTEST_ARGS)
	SLUICE_REFRESH_IMAGES=1 $(BIN)/pytest -v tests/integration/test_doctor.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# Fault injection at CI scale (broker and stage kills, hostile records, engine crash and stall);
# .ci/run runs it after `make test`, which deselects it; the larger run is bench/chaos.py.
chaos: $(STAMP)
	$(BIN)/python -m infra fetch
	$(BIN)/pytest -v -m chaos tests/chaos $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.transport
	$(BIN)/python -m bench.gateway_load

# docs/CONFIGURATION.md is generated from pipeline/config.py; a unit test fails when it is stale.
.PHONY: config-docs
config-docs: $(STAMP)
	$(BIN)/python -m pipeline.config_reference > docs/CONFIGURATION.md.tmp
	mv docs/CONFIGURATION.md.tmp docs/CONFIGURATION.md

up: $(STAMP)
	$(BIN)/sluice up --minio

down: $(STAMP)
	$(BIN)/sluice down

clean:
	rm -rf $(VENV) .sluice .pytest_cache .mypy_cache .ruff_cache
