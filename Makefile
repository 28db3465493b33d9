# Fresh-machine entry points: `make demo` (end-to-end run on the example set), `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build by default; a GPU user overrides, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint clean

$(BIN)/tvae-em: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/tvae-em

setup: $(BIN)/tvae-em

demo: setup
	bash examples/run_demo.sh $(BIN)

test: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf demo_out
