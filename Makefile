# Two entry points for a fresh machine: `make run` and `make test`. Each builds .venv on first use.
# torch==2.13.0 goes in first: it is the CPU wheel this machine carries, and installing the
# project before it would let pip resolve `torch` to a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.d3s-installed
CONFIG ?= configs/quickstart.yaml
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

# Browser and compose tests need these Debian packages; as root with apt they are installed,
# elsewhere those tests skip and say why.
SYSTEM_PACKAGES := chromium chromium-driver docker-compose

.PHONY: venv system-deps run test test-slow lint bench-select bench-learning clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/d3s run $(CONFIG)

test: lint system-deps
	$(BIN)/python -m pytest -m "not slow" -q

system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v docker-compose >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(SYSTEM_PACKAGES) (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "not installed: $(SYSTEM_PACKAGES) (not root or no apt); the browser and compose tests will skip"; fi

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
