#!/usr/bin/env bash
# Build Horovod 0.28.1 against the installed torch (DEVELOPERS.md, "Distributed notes"):
# only its sdist builds with today's torch, after raising CMAKE_CXX_STANDARD from 14 to 17.
# Needs cmake, a C++17 compiler and the Python headers; takes about 100 s.
#   scripts/install_horovod.sh            # into the active Python environment
set -euo pipefail
PY=${PYTHON:-python}
VERSION=0.28.1
"$PY" -c "import torch" 2>/dev/null || { echo "install torch first (make venv)" >&2; exit 2; }
command -v cmake >/dev/null || "$PY" -m pip install -q cmake
# --no-build-isolation builds with this environment's own packaging tools
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
HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO \
  "$PY" -m pip install --no-build-isolation --no-cache-dir "$SRC"
"$PY" -c "import horovod.torch as hvd; print('horovod', hvd.__version__ if hasattr(hvd, '__version__') else '', 'ok')"
echo "then: horovodrun -np 2 -H localhost:2 --gloo python -m uniter3m.cli pretrain --config CONFIG"
