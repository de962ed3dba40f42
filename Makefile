# zk0_pipelines — every machine is new: these targets install everything the project needs.
#   make demo   set up .venv (+ the DVC tool env) and run the whole lineage on the embedded offline default
#   make test   set up what is missing and run the test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON312 ?= $(firstword $(wildcard /root/.pyenv/versions/3.12.*/bin/python3.12) $(shell command -v python3.12))
UV_VERSION := 0.13.8
ROOT := $(abspath .)
UV := $(ROOT)/.tools/bootstrap/bin/uv
DVC := $(ROOT)/.tools/dvc/bin/dvc
VENV := $(ROOT)/.venv

# Caches live in the user's cache dir so a second install (and CI on the same machine) is fast;
# nothing else is written outside the checkout.
export UV_CACHE_DIR ?= $(HOME)/.cache/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
export DAGSTER_HOME := $(ROOT)/dagster_home
export ZK0_DVC := $(DVC)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export RAY_USAGE_STATS_ENABLED := 0
export TMPDIR := $(ROOT)/.zk0/tmp

PYTEST_ARGS ?=
# Two pytest-xdist workers: a single test leaves one of the two cores idle a third of the time (one
# Python process, subprocess starts, waits on Dagster/Flower); tests/conftest.py groups them by module.
PYTEST_WORKERS ?= 2

.PHONY: help install demo test lint config ui mlflow-ui clean-state system-deps demo-sim postgres-install postgres-up postgres-down ui-postgres mlflow-ui-postgres serve
help:
	@echo "make demo   - install and run the offline demo lineage (datasets -> registered model -> release folder)"
	@echo "make test   - install what is missing and run the tests"
	@echo "make ui     - Dagster webserver + daemon on http://127.0.0.1:3000"
	@echo "make lint   - ruff"
	@echo "make config - rewrite the tables generated from the typed config (pyproject app config, README)"
	@echo "make system-deps - Debian's Mesa (offscreen OpenGL for the SO-101 simulator), when missing"
	@echo "make demo-sim    - the demo on scripted-expert datasets recorded in the SO-101 simulator"
	@echo "make ui-postgres / mlflow-ui-postgres - the same on the checkout's private PostgreSQL (.zk0/postgres)"
	@echo "make postgres-up / postgres-down      - start / stop that PostgreSQL (Debian's postgresql package)"
	@echo "make serve  - lerobot policy server on the registry's champion, 127.0.0.1:8080 (insecure protocol)"

$(UV):
	@test -x "$(PYTHON312)" || { echo "Python 3.12 not found (set PYTHON312=/path/to/python3.12)"; exit 1; }
	"$(PYTHON312)" -m venv $(ROOT)/.tools/bootstrap
	$(ROOT)/.tools/bootstrap/bin/python -m pip install -q "uv==$(UV_VERSION)"

# The application environment, exactly as uv.lock says (dev group included: pytest, ruff).
# --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (as on these machines) Python never writes .pyc
# files, so every process (Flower clients, Ray workers, Dagster's) would compile torch, transformers and
# lerobot from source at each import; compiled once here, an import of the policy stack costs ~3x less.
$(VENV)/.zk0-installed: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --compile-bytecode --python "$(PYTHON312)"
	touch $@

# DVC in its own environment: its hydra-core pins antlr4 4.9, which breaks Dagster's asset selection
# parser (needs antlr4 >= 4.10). The pipeline only calls DVC as a CLI, so the two never share a process.
$(ROOT)/.tools/dvc/.zk0-installed: $(UV) tools/dvc-requirements.lock
	$(UV) venv -q --allow-existing --python "$(PYTHON312)" $(ROOT)/.tools/dvc
	$(UV) pip install -q --compile-bytecode --python $(ROOT)/.tools/dvc/bin/python --require-hashes \
	  -r tools/dvc-requirements.lock
	touch $@

install: $(VENV)/.zk0-installed $(ROOT)/.tools/dvc/.zk0-installed
	@mkdir -p $(TMPDIR)

demo: install
	$(VENV)/bin/zk0 demo

# pytest's exit code 5 (no test collected) is a failure, said out loud.
test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS) || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc; }

lint: install
	$(VENV)/bin/ruff check zk0_pipelines tests bench
	$(VENV)/bin/ruff format --check zk0_pipelines tests bench

# pyproject.toml's [tool.flwr.app.config] and the README's config tables, rendered from the code.
config: install
	$(VENV)/bin/zk0 config --write

ui: install
	$(VENV)/bin/zk0 ui

mlflow-ui: install
	$(VENV)/bin/zk0 mlflow-ui

# Offscreen OpenGL for the SO-101 MuJoCo simulator (MUJOCO_GL=egl, or osmesa): Debian's Mesa packages.
SIM_APT_PACKAGES := libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libosmesa6
system-deps:
	@missing=$$(for p in $(SIM_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else echo "system-deps: Mesa already installed"; fi

demo-sim: install system-deps
	ZK0_DATASET_REGISTRY=configs/datasets.sim.yaml $(VENV)/bin/zk0 demo

serve: install
	$(VENV)/bin/zk0 serve

# PostgreSQL profile: Debian's server binaries, run by zk0_pipelines/postgres.py on .zk0/postgres (port ZK0_PG_PORT,
# default 55432). The sqlite instance stays the default of every other target.
postgres-install:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }

postgres-up: install postgres-install
	$(VENV)/bin/python -m zk0_pipelines.postgres start

postgres-down: install
	$(VENV)/bin/python -m zk0_pipelines.postgres stop

ui-postgres: install postgres-install
	ZK0_STORAGE=postgres DAGSTER_HOME=$(ROOT)/dagster_home/postgres $(VENV)/bin/zk0 ui

mlflow-ui-postgres: install postgres-install
	ZK0_STORAGE=postgres $(VENV)/bin/zk0 mlflow-ui
