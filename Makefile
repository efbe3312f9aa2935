# The two commands of the README: `make run` (set up, then serve the app) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMACPP := $(VENV)/.llamacpp
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMACPP_JOBS ?= $$(nproc)
HOST ?= 127.0.0.1
PORT ?= 7860
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED = False
export TOKENIZERS_PARALLELISM = false

.PHONY: setup llamacpp run test test-fast bench docs clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# llama.cpp (for GGUF export checks) in a step of its own: a source build of a few minutes, once.
llamacpp: $(LLAMACPP)

$(LLAMACPP): requirements-llamacpp.txt | $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMACPP_JOBS) $(BIN)/python -m pip install -q --no-cache-dir -r requirements-llamacpp.txt
	$(BIN)/python -c "import llama_cpp; print('llama.cpp', llama_cpp.__version__)"
	touch $(LLAMACPP)

# The page first: the app is served at once, and llama.cpp (needed only to check GGUF exports) is built
# beside it, on one core and at low priority, when it is missing; a GGUF export says so until it is ready.
BUILDING := $(VENV)/.llamacpp-building
run: setup
	@if [ ! -f $(LLAMACPP) ] && [ -z "$$(find $(BUILDING) -mmin -60 2>/dev/null)" ]; then \
	  echo "building llama.cpp beside the app (for GGUF exports; log: $(VENV)/llamacpp-build.log)"; \
	  touch $(BUILDING); \
	  ( nice -n 19 $(MAKE) llamacpp LLAMACPP_JOBS=1 > $(VENV)/llamacpp-build.log 2>&1; rm -f $(BUILDING) ) & \
	fi
	SUBNET_EXPLORER_LLAMACPP_BUILDING=$(BUILDING) $(BIN)/python app.py --host $(HOST) --port $(PORT)

test: setup llamacpp
	$(BIN)/python -m pytest -q tests

test-fast: setup llamacpp
	$(BIN)/python -m pytest -q tests -m "not slow and not browser"

bench: setup
	$(BIN)/python bench/dense.py

# every figure of README.md and docs/ written from the benchmarks' JSON (a test checks they agree)
docs: setup
	$(BIN)/python bench/docs.py

clean:
	rm -rf $(VENV) .pytest_cache
