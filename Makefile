# Two entry points for a fresh machine: `make run` and `make test`. Each builds .venv on first use.
# torch==2.13.0 goes in first: it is the CPU wheel this machine carries, and installing the
# project before it would let pip resolve `torch` to a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.d3s-installed
CONFIG ?= configs/quickstart.yaml
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: venv run test test-slow lint bench-select bench-learning clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/d3s run $(CONFIG)

test: lint
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: venv
	$(BIN)/python -m pytest -m slow -q

# Style, then the dependency rule (pyproject.toml [tool.importlinter]).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench-select: venv
	$(BIN)/python -m bench.selection

bench-learning: venv
	$(BIN)/python -m bench.learning

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs .cache
