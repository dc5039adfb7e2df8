# saekit: `make demo` trains on the embedded default; `make test` runs the whole suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-deps install lint format clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/saekit train

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
