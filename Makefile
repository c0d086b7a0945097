# Two commands: `make demo` and `make test`. Both bootstrap .venv on a machine with only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgecomp-installed

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so no dependency can pull a CUDA build
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/edgecomp build minilm --target ort-fp32 --target ort-int8 --out build/demo

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python tools/bench_ort_int8.py

clean:
	rm -rf build .pytest_cache
