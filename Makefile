# The two set-up commands (README): `make run` and `make test`. Both install into .venv/.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test test-fast lint bench ui-mlflow ui-prefect clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,docker]'
	touch $@

install: $(BIN)/.installed

run: install  ## the whole pipeline on the embedded default data
	$(BIN)/transfer run

test: install  ## the test suite
	$(BIN)/pytest

test-fast: install  ## the inner loop: no slow tests, two workers, one test file per worker
	$(BIN)/pytest -m "not slow" -n 2 --dist loadfile

lint: install
	$(BIN)/hadolint Dockerfile

bench: install
	$(BIN)/python benchmarks/transfer_gain.py
	$(BIN)/python benchmarks/pipeline_overhead.py
	$(BIN)/python benchmarks/feature_cache.py
	$(BIN)/python benchmarks/multitask_tasks.py
	$(BIN)/python benchmarks/train_speed.py

ui-mlflow: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --port 5000

ui-prefect: install
	$(BIN)/prefect server start --host 127.0.0.1

clean:
	rm -rf artifacts models metrics data/.cache
