# Two commands do everything on a fresh machine:
#   make quickstart   install, then run the main job
#   make test         install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install quickstart test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	# torch first, pinned: these builds lie on disk here, and open_clip needs a matching torchvision.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev,triton,demo]"

quickstart: install
	$(BIN)/diffalign quickstart

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check diffalign tests train eval benchmarks demos
