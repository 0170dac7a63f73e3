# Two commands: `make run` serves Tessera, `make test` checks it. Both install what they
# need on a fresh machine and are quick the second time (stamps keyed on pyproject.toml).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU build of torch, installed before the project so that nothing pulls a GPU build.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
API_PORT ?= 8001
# `make run` seeds the demo: its accounts, and every committed demo adapter pushed through
# the pipeline (DEMO=0: accounts only). The suites are sampled so that the demo evaluates in
# minutes on a laptop (FULL_SUITES=1: the whole files, hours on a CPU). Their hidden splits
# are drawn from TESSERA_SUITE_SEED, or on a development machine from a seed made once in
# var/suite-seed.
DEMO ?= 1
FULL_SUITES ?=
# When `make run` started, so that it can say how long the demo took, install included.
RUN_STARTED := $(shell date +%s)

.PHONY: run test install install-dev services lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-run: pyproject.toml | $(PY)
	@echo "Installing Tessera and its dependencies into $(VENV)…"
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-run
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.stamp-run
install-dev: $(VENV)/.stamp-dev

# Development settings for every manage.py command below and the processes run-local.sh
# starts (DEBUG is off unless DJANGO_DEBUG says otherwise); `make test` runs manage.py too.
run test: export DJANGO_DEBUG := true

run: install
	@echo "Migrating the database…"
	$(PY) manage.py migrate --no-input
	@echo "Preparing the base model (converted once, then kept in var/models)…"
	$(PY) manage.py prepare_base_model
	@echo "Loading the benchmark suites$(if $(FULL_SUITES),, (sampled for the demo; FULL_SUITES=1 loads them whole))…"
	$(PY) manage.py load_suites $(if $(FULL_SUITES),,--sample)
	@echo "Creating the demo accounts$(if $(filter 1,$(DEMO)), and uploading the demo adapters)…"
	$(PY) manage.py seed_demo $(if $(filter 1,$(DEMO)),--adapters)
	@echo "Starting the web server, the inference server and a Celery worker…"
	HOST=$(HOST) PORT=$(PORT) API_PORT=$(API_PORT) PY=$(PY) RUN_STARTED=$(RUN_STARTED) \
		FOLLOW_DEMO=$(DEMO) SAMPLED_SUITES=$(if $(FULL_SUITES),0,1) sh platform/run-local.sh

services:
	sh platform/ensure-test-services.sh

test: install-dev services
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) manage.py makemigrations --check --dry-run
	$(PY) -m pytest

format: install-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
