#!/usr/bin/env bash
# Build Horovod 0.28.1 against the installed torch (DEVELOPERS.md, "Distributed notes"):
# only its sdist builds with today's torch, after raising CMAKE_CXX_STANDARD from 14 to 17.
# Needs cmake, a C++17 compiler and the Python headers; the build takes about 2 minutes, once:
# the wheel is kept in $HOROVOD_WHEEL_DIR (default build/wheels/, keyed by the torch version and
# the operations) and later runs only install it (seconds).
#   scripts/install_horovod.sh            # into the active Python environment (PYTHON=... to pick one)
# Operations: with CUDA present (torch.cuda.is_available() and nvcc or CUDA_HOME) the all-reduce
# runs on NCCL (HOROVOD_GPU_OPERATIONS=NCCL); CPU tensors always use Gloo. Override with
# HOROVOD_GPU_OPERATIONS=NCCL|none.
set -euo pipefail
PY=${PYTHON:-python}
VERSION=0.28.1
cd "$(dirname "$0")/.."
"$PY" -c "import torch" 2>/dev/null || { echo "install torch first (make venv)" >&2; exit 2; }
TORCH_TAG=$("$PY" -c "import torch; print(torch.__version__.replace('+', '_'))")
GPU_OPS=${HOROVOD_GPU_OPERATIONS:-}
if [ -z "$GPU_OPS" ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)" 2>/dev/null \
     && { command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ]; }; then
    GPU_OPS=NCCL
  else
    GPU_OPS=none
  fi
fi
WHEEL_DIR=${HOROVOD_WHEEL_DIR:-build/wheels}/horovod-$VERSION-torch$TORCH_TAG-$GPU_OPS
mkdir -p "$WHEEL_DIR"
if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
  command -v cmake >/dev/null || "$PY" -m pip install -q cmake
  # --no-build-isolation builds with this environment's own packaging tools (and its torch)
  "$PY" -c "import wheel, setuptools" 2>/dev/null || "$PY" -m pip install -q wheel setuptools
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$WORK"
  tar -xzf "$WORK/horovod-$VERSION.tar.gz" -C "$WORK"
  SRC="$WORK/horovod-$VERSION"
  for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
    sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$f"
    grep -q "CMAKE_CXX_STANDARD 17" "$f" || { echo "could not set C++17 in $f" >&2; exit 1; }
  done
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
         HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO
  if [ "$GPU_OPS" = NCCL ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL   # all-reduce on the GPUs, not through host memory
  else
    unset HOROVOD_GPU_OPERATIONS
  fi
  echo "building Horovod $VERSION (CPU: Gloo, GPU: $GPU_OPS) -> $WHEEL_DIR" >&2
  "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$WHEEL_DIR" "$SRC"
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
# its run-time dependencies (horovodrun needs psutil, cloudpickle, pyyaml)
"$PY" -m pip install -q cloudpickle psutil pyyaml packaging
"$PY" -c "import horovod.torch as hvd; print('horovod ok: gloo', hvd.gloo_built(), 'nccl', hvd.nccl_built())"
echo "then: horovodrun -np 2 -H localhost:2 --gloo uniter3m pretrain --config CONFIG"
