# Every target sets itself up: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# llama.cpp is built for this CPU (-march=native) but without its AMX kernels: on the x86-64
# VMs mathq is tested on they die with SIGILL at their first tile instruction, while the
# AVX-512/VNNI paths are fine. Explicit -mno-* flags win over -march=native in GCC and clang.
ifeq ($(shell uname -m),x86_64)
LLAMA_FLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif

# `make install CUDA=1 [CUDA_ARCH=90]` builds llama-cpp-python with llama.cpp's CUDA backend
# for the GPUs of this machine (`native`) or the given compute capability (90: H100/H200).
# The -mno-amx-* flags stay on: they reach only the host C/C++ compiler (CFLAGS/CXXFLAGS),
# which still builds the CPU backend that runs whatever is not offloaded; nvcc takes its
# flags from CMAKE_CUDA_FLAGS, which they never enter (nvcc would reject them), and
# ggml-cuda hands its host compiler only its own warning flags (-Xcompiler).
# Each flavour (and CUDA architecture) has its own stamp; switching rebuilds llama-cpp-python
# from source. CUDA builds bypass pip's wheel cache, so it only ever holds the CPU wheel,
# which switching back to the CPU build may reuse.
CUDA      ?=
CUDA_ARCH ?= native
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
ifeq ($(CUDA),1)
STAMP       := $(VENV)/.installed-cuda-$(CUDA_ARCH)-stamp
LLAMA_CMAKE := -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH)
else
STAMP       := $(VENV)/.installed-cpu-stamp
LLAMA_CMAKE :=
endif
LLAMA_ENV   := CFLAGS="$(LLAMA_FLAGS)" CXXFLAGS="$(LLAMA_FLAGS)" CMAKE_ARGS="$(LLAMA_CMAKE)"
REBUILD_LLAMA := $(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
	--no-binary llama-cpp-python

.PHONY: install test lint demo screenshots card

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(CUDA),1)
	@echo "Building llama-cpp-python with CUDA for architecture $(CUDA_ARCH) (several minutes)..."
	$(LLAMA_ENV) $(REBUILD_LLAMA) --no-cache-dir '$(LLAMA_CPP_PYTHON)'
else
	@if ls $(VENV)/.installed-cuda-*-stamp >/dev/null 2>&1; then \
	  echo "Switching llama-cpp-python back to the CPU build..."; \
	  $(LLAMA_ENV) $(REBUILD_LLAMA) '$(LLAMA_CPP_PYTHON)'; fi
	@echo "Installing mathq and llama-cpp-python (the first build of llama.cpp takes about 5 minutes on 2 cores)..."
endif
	$(LLAMA_ENV) $(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*stamp
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check toolkit tests benchmarks

# The pipeline on the bundled tiny demo model, offline, into build/tiny-demo/: one
# `mathq build` converts, quantizes, writes Modelfiles, smoke-tests BF16 and each variant on
# the model's 400 held-out distractor problems, benches them, measures KL divergence (on
# held-out text of the model's own domain) and writes the report, ending with its table and
# the recommendation. A rerun redoes nothing.
DEMO_QUANTS := Q2_K,Q4_K_M,Q8_0
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/mathq build tiny-demo --quant $(DEMO_QUANTS) --tune Q2_K

# The demo's report in headless Chromium at desktop (1280 px) and phone (390 px) widths,
# written to docs/ for the README. Needs Chromium (apt-get install chromium).
screenshots: demo
	$(BIN)/python scripts/report_screenshots.py build/tiny-demo/report/report.html docs/

# The model card `mathq publish tiny-demo --hf-repo ...` would upload for the demo build,
# written to docs/ for the README (a dry run: nothing is sent).
card: demo
	HF_HUB_OFFLINE=1 $(BIN)/mathq publish tiny-demo --hf-repo me/tiny-demo-GGUF --dry-run --json \
	  | $(BIN)/python -c 'import json,sys; print(next(f["text"] for f in json.load(sys.stdin)["hub"]["files"] if f["path_in_repo"] == "README.md"), end="")' \
	  > docs/model-card-demo.md
