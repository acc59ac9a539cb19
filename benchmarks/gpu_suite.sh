#!/usr/bin/env bash
# The GPU checks of issue 13 in one run (< 8 min on one H200): CUDA correctness tests, then the
# interleaved benchmarks; every result lands as JSON (and logs) under $OUT (default ./gpu_out).
#
# The device image has torch, transformers, tensorboard, h5py, msgpack but not lmdb or pydantic:
# fetch their wheels here first (network), into .whl/ (ignored by git), then carry .whl along:
#     scripts/fetch_gpu_wheels.sh            # on the CPU machine, once
#     bash benchmarks/gpu_suite.sh           # on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# our package (recipes included) without touching the image's packages
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/uniter3m . \
    && export PYTHONPATH=/tmp/uniter3m:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || true
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee "$OUT/versions.txt"

status=0
# 1. correctness: bf16 and fp16 + GradScaler steps, compiled vs eager, packed vs unpacked (~1 min)
timeout 240 python3 -m pytest -q tests/test_cuda.py --junitxml "$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log" || status=1

# 2. the fixed-shape base step: ours eager / compiled / packed (ragged) vs HF SDPA eager / compiled (~3 min)
timeout 300 python3 benchmarks/model_step.py --size base --batch 128 --rounds 4 --steps 5 \
    --json "$OUT/model_step.json" 2>&1 | tee "$OUT/model_step.log" || status=1

# 3. real-length pretraining (synthetic corpus with MELD-like lengths): plain vs packed vs compiled (~3 min)
timeout 300 python3 benchmarks/pretrain_throughput.py --size base --device cuda --utterances 6000 \
    --rounds 2 --chunk 40 --workers 8 --max-tokens 16384 --contenders plain,packed,compiled \
    --json "$OUT/pretrain_throughput.json" 2>&1 | tee "$OUT/pretrain_throughput.log" || status=1
exit $status
