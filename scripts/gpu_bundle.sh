#!/usr/bin/env bash
# The folder a GPU run carries (benchmarks/gpu_suite.sh installs from it with --no-index):
#   wheels/     exact pins of our dependencies that the device image lacks, and our own wheel
#   tokenizer/  a small WordPiece tokenizer trained on the synthetic corpus (the MiniLM package is an
#               88 MB wheel, over the 64 MiB a device run may carry)
#   manifest.json  the Python version, the pins and every file's size (the total is checked)
# Built HERE (it downloads); nothing on the device reaches the network.
#
#   scripts/gpu_bundle.sh                                        # .gpu_bundle/ for the device (Python 3.12)
#   scripts/gpu_bundle.sh --python 3.11 --out build/gpu_bundle   # for this machine's Python (the dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=3.12
OUT=.gpu_bundle
PYTHON=${PYTHON:-.venv/bin/python}
MAX_BYTES=$((20 * 1024 * 1024))
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY_VERSION=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "usage: $0 [--python X.Y] [--out DIR]" >&2; exit 2 ;;
    esac
done

# What the device image lacks of our dependencies (it has torch, numpy, msgpack, safetensors,
# transformers, tokenizers, h5py, tqdm, tensorboard, matplotlib, scikit-learn, scipy, pyyaml:
# those together weigh over 100 MB, so they are not carried; the suite's install step fails at once,
# naming the package, if one is missing there). typing-extensions is carried because pydantic-core
# needs a newer one than an older image may hold. The versions are those CI tests.
PINS=(
    lmdb==3.0.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do PLATFORMS+=(--platform "$p"); done

rm -rf "$OUT"
mkdir -p "$OUT/wheels"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT/wheels" "${PINS[@]}"
# our package as a wheel: the device needs no build backend (setuptools >= 77) to install it
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/wheels" .
"$PYTHON" scripts/gpu_bundle_tokenizer.py "$OUT/tokenizer"

"$PYTHON" - "$OUT" "$PY_VERSION" "$MAX_BYTES" "${PINS[@]}" <<'EOF'
import json, sys
from pathlib import Path

out, version, limit, pins = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
total = sum(files.values())
manifest = {"python": version, "pins": pins, "bytes": total, "files": files}
(out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
print(f"{out}: {len(files)} files, {total / 2**20:.1f} MiB for Python {version}")
if total > limit:
    sys.exit(f"{out} holds {total / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB a device run may spend on it")
EOF
