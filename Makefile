# Every target sets itself up: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# llama.cpp is built for this CPU (-march=native) but without its AMX kernels: on the x86-64
# VMs mathq is tested on they die with SIGILL at their first tile instruction, while the
# AVX-512/VNNI paths are fine. Explicit -mno-* flags win over -march=native in GCC and clang.
ifeq ($(shell uname -m),x86_64)
LLAMA_FLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif

.PHONY: install test lint demo screenshots

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing mathq and llama-cpp-python (the first build of llama.cpp takes about 5 minutes on 2 cores)..."
	CFLAGS="$(LLAMA_FLAGS)" CXXFLAGS="$(LLAMA_FLAGS)" $(BIN)/python -m pip install --quiet -e '.[dev]'
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
	HF_HUB_OFFLINE=1 $(BIN)/mathq build tiny-demo --quant $(DEMO_QUANTS)

# The demo's report in headless Chromium at desktop (1280 px) and phone (390 px) widths,
# written to docs/ for the README. Needs Chromium (apt-get install chromium).
screenshots: demo
	$(BIN)/python scripts/report_screenshots.py build/tiny-demo/report/report.html docs/
