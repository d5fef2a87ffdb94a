# Sluice: every target installs what it needs on a fresh machine (Python venv, Kafka jars via
# Maven, MinIO via go install); downloads are cached under ~/.cache/sluice and .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TRAIN  := $(VENV)/.installed-train
PYTEST_ARGS ?=

.PHONY: help install demo test unit lint typecheck bench up down clean

help:
	@echo "make demo | test | unit | lint | typecheck | bench | up | down | clean"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,cpu]'
	touch $(STAMP)

# torch & co. (~4 GB): only the model-build tests and training need them, not the demo.
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

unit: $(TRAIN)
	$(BIN)/pytest -v -m "not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.transport
	$(BIN)/python -m bench.gateway_load

up: $(STAMP)
	$(BIN)/sluice up --minio

down: $(STAMP)
	$(BIN)/sluice down

clean:
	rm -rf $(VENV) .sluice .pytest_cache .mypy_cache .ruff_cache
