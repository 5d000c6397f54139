# Human entry points. Each target creates .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NS := $(VENV)/bin/northstar
STAMP := $(VENV)/.installed-stamp
DEMO ?= demo
PRESET ?= demo

# Debian packages the tests and the demo start for real, as command:package: redis-server
# (the online state and the event stream), nginx (the front proxy that bounds request
# bodies), promtool from `prometheus` (checks and unit-tests the alert rules' PromQL) and
# chromium (renders the demo's HTML page headless in a test).
SYSTEM_PACKAGES := redis-server:redis-server nginx:nginx-light promtool:prometheus \
	chromium:chromium

.PHONY: sysdeps venv demo test test-fast lint format loadtest bench soak gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat mode: a plain .pth to the repo root, so new packages need no reinstall
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	$(PY) -m pip check
	touch $(STAMP)

sysdeps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: sysdeps $(STAMP)

## demo: synthetic world -> train -> evaluate -> export -> serve -> recommend (gRPC + HTTP)
demo: venv
	$(NS) demo --dir $(DEMO) --preset $(PRESET)

## test: everything that runs on a CPU machine (unit + integration + slow)
test: venv
	$(PY) -m pytest -m "not gpu" -q

test-fast: venv
	$(PY) -m pytest -m "not gpu and not integration and not slow" -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## loadtest: tritonserver + headless Locust (gRPC and HTTP users) -> reports/loadtest/
## (LOADTEST_ARGS, e.g. "--repo model_repository --run-time 1m --users 32")
loadtest: venv
	$(PY) -m loadtest.run --out reports/loadtest $(LOADTEST_ARGS)

## bench: (a) ONNX in-process, (b) Triton retrieval, (c) recommend sweep, (d) naive FastAPI,
## (e) faiss, side by side -> reports/bench/ (BENCH_ITEMS, BENCH_ARGS)
BENCH_ITEMS ?= 100000 1000000
bench: venv
	$(NS) bench --items $(BENCH_ITEMS) --out reports/bench $(BENCH_ARGS)

## soak: simulator + Locust + retrain -> canary -> promote against a real server, with
## memory sampling -> reports/soak/ (SOAK_SECONDS, default 600; SOAK_ARGS). Exit 1 on a lost
## event, an error rate or RSS growth over threshold, or no promote. Not part of `make test`
## (tests/integration/test_soak.py runs a 60-second one).
SOAK_SECONDS ?= 600
soak: venv
	$(NS) soak --duration $(SOAK_SECONDS) --out reports/soak $(SOAK_ARGS)

## gpu-check: the retrieval graph's in-process ceiling on a CUDA GPU (torch fp32/fp16/bf16,
## onnxruntime's CUDA provider where installed) -> reports/gpu/. Runs on the GPU machine's
## own Python and torch (GPU_PYTHON), not the venv, whose torch is the CPU wheel.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) -m loadtest.gpu_ceiling --out reports/gpu $(GPU_ARGS)

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
