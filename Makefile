# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv on first use. torch==2.13.0 is pinned because the CPU
# build of that release is what these machines (and CI) install quickly;
# on a GPU box install your CUDA torch first and `make` reuses it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench lint

$(BIN)/.installed: setup.py CMakeLists.txt $(wildcard csrc/*) gpd_kernels/schemas.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=64" wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m gpd_train

test: setup
	$(BIN)/python -m pytest tests/ -q

bench: setup
	$(BIN)/python -m pytest benchmarks/

lint: setup
	$(BIN)/ruff check .
