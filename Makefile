# Two commands do everything on a fresh machine: `make test` and `make demo`.
# A second run reuses .venv and the built extension (stamps below) and starts in seconds.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-stamp
EXT    := build/.ext-stamp
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
NVCC   ?= $(shell command -v nvcc 2>/dev/null)
OUT    ?= demo-out
DATA   ?= digits

.PHONY: test demo bench bench-model cuda-compile-check lint clean help

help:
	@echo "make test   - set up .venv, build the extension, compile-check CUDA, run the tests"
	@echo "make demo   - set up, then run the whole story (python -m pydecouple demo) into $(OUT)/"
	@echo "make bench  - CPU kernel benchmark (benchmarks/results/)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(EXT): $(DEPS) $(CSRC) setup.py
	@mkdir -p build
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

cuda-compile-check:
	@if [ -n "$(NVCC)" ]; then \
		echo "nvcc found ($(NVCC)): compiling the torch-free CUDA kernels for sm_80 and sm_90a"; \
		cmake -S . -B build-cmake -G Ninja -DPYDECOUPLE_CUDA_ONLY=ON -DCMAKE_CUDA_COMPILER=$(NVCC) >/dev/null && \
		cmake --build build-cmake --target pydecouple_cuda_kernels; \
	else \
		echo "SKIP cuda-compile-check: no nvcc on PATH, the CUDA kernels were not compiled"; \
	fi

test: $(EXT) cuda-compile-check
	$(PY) -m pytest -q tests

demo: $(EXT)
	$(PY) -m pydecouple demo --data $(DATA) --out $(OUT)

bench: $(EXT)
	$(PY) benchmarks/bench_gated_conv.py

bench-model: $(EXT)
	$(PY) benchmarks/bench_model.py --suite --dtypes float32,bfloat16

clean:
	rm -rf build build-cmake pydecouple/_C*.so *.egg-info
