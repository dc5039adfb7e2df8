# saekit: `make demo` trains on the embedded default; `make test` runs the whole suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-deps install lint format clean bench bench-gpu

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/saekit train
	@echo "saekit is installed in $(VENV): run 'source $(VENV)/bin/activate' to put it on PATH"

# test set-up outside Python: Chromium for the dashboard's browser checks, installed where
# root and apt-get allow; otherwise those tests skip and say why (never fails the target)
CHROMIUM := command -v chromium || command -v chromium-browser || command -v google-chrome
test-deps:
	@($(CHROMIUM)) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q chromium \
	       || { timeout 600 apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	            timeout 900 apt-get install -y -q chromium; }; } >/dev/null 2>&1; } \
	  || echo "make test-deps: no chromium, and apt-get could not install it: the browser checks skip"

test: $(STAMP) test-deps
	$(BIN)/python -m pytest -m "not slow" tests

test-slow: $(STAMP) test-deps
	$(BIN)/python -m pytest -m slow tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/saekit bench

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

# ---- GPU machine (CUDA torch already installed there; nothing is installed by this) ----
# `make bench-gpu`: the CUDA tests (kernels compiled by Triton, device-parametrised tests), then
# bench_step and bench_e2e at B=4096, d_in=768, d_sae 16384 and 131072; JSON under
# benchmarks/results/, and the README GPU table in benchmarks/results/gpu_table.md.
# Peers (sae-lens, eai-sparsify) are used when importable: wheels from
# benchmarks/gpu_wheels.sh, unpacked into GPU_SITE.
GPU_PY ?= python3
GPU_SITE ?= /tmp/saekit-gpu-site
GPU_ENV = PYTHONPATH=$(CURDIR)/src:$(GPU_SITE) PYTHONUNBUFFERED=1 SPARSIFY_DISABLE_TRITON=0

bench-gpu:
	@if [ -d .whl ]; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-build-isolation \
	  --target $(GPU_SITE) .whl/*; fi
	$(GPU_ENV) $(GPU_PY) -m pytest -p no:cacheprovider -m "not slow" tests/test_kernels_triton.py \
	  tests/test_kernels.py tests/test_device.py tests/test_memory_paths.py tests/test_encoder_chunk.py
	for F in 16384 131072; do \
	  $(GPU_ENV) $(GPU_PY) benchmarks/bench_step.py --no-reexec --device cuda --dtype bfloat16 \
	    --B 4096 --d-in 768 --d-sae $$F --k 32 --repeats 10 --warmup 3 --no-lm --rules '' || exit 1; \
	  $(GPU_ENV) $(GPU_PY) benchmarks/bench_e2e.py --device cuda --B 4096 --n-embd 768 \
	    --d-sae $$F --k 32 --tokens 4194304 --repeats 2 || exit 1; \
	done
	$(GPU_PY) benchmarks/gpu_table.py > benchmarks/results/gpu_table.md
	cat benchmarks/results/gpu_table.md
