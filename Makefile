# Two commands for a fresh machine: `make demo` and `make test`. Both run `make setup` first.
PYTHON ?= python3
VENV ?= .venv
# On our CPU-only machines this picks the local CPU wheel; users may set TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,plot]"
	touch $@

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/sparsedit demo --overwrite

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
