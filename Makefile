# The two commands of the README:   make demo   and   make test
# Each creates .venv (if missing) and installs what it needs; nothing else is assumed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test lint install clean

$(BIN)/tinysft: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build first, explicitly: a bare `torch` requirement would pull a multi-GB CUDA build.
	# For a GPU: make install TORCH="torch --index-url <your CUDA wheel index>"
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,qlora,bench,formats]"
	# tcmalloc makes CPU training ~25% faster (tinysft/models/cpu/allocator.py); best effort, where apt-get runs.
	-$(BIN)/python -c "import sys; from tinysft.models.cpu.allocator import tcmalloc_path; sys.exit(tcmalloc_path() is None)" \
		|| { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && { apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 \
		|| { apt-get update -q && apt-get install -y -q --no-install-recommends libtcmalloc-minimal4; }; } >/dev/null 2>&1; } || true
	# Chromium for the browser tests (playwright drives the distribution's build; its own download needs a CDN).
	-command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && { apt-get install -y -q --no-install-recommends chromium \
		|| { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }; } >/dev/null 2>&1; } || true
	touch $(BIN)/tinysft

install: $(BIN)/tinysft

demo: install
	$(BIN)/tinysft demo --out runs/demo

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
