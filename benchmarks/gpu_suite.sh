#!/usr/bin/env bash
# The GPU checks in one command that fits a device lease (10 min per command, 15 min per session with
# the start): install from the carried bundle, the CUDA tests, the interleaved step benchmark (ours eager /
# compiled / packed vs HF SDPA eager / compiled; base, B=128, text 30 + face 64x342 + speech 64x768, bf16),
# real-length pretraining throughput with and without packing, MFU on real positions. Results land under
# $OUT (at most 8 files: what a device run brings back): environment.txt, steps.json, *.log, *.json.
#
#   scripts/gpu_bundle.sh                    # here, once: .gpu_bundle/ (ignored by git; carry it)
#   bash benchmarks/gpu_suite.sh             # on the GPU machine (python3 = the image's CUDA torch)
#   bash benchmarks/gpu_suite.sh --dry-run   # on the CPU (make ci): a bundle for this Python, the same
#                                            # install (fresh venv, no index), the same steps at tiny sizes
#   bash benchmarks/gpu_suite.sh --plan      # the steps and their time budgets, as JSON
#
# Every step has a time budget on the device (its timeout there); their sum is checked against
# SUITE_BUDGET before anything runs. The first failed step stops the suite (set -euo pipefail).
# The steps run from the INSTALLED package, in a copy of tests/, benchmarks/ and configs/ outside
# the source tree (the source tree's uniter3m/recipes/ is empty: only an install maps the recipes).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
MODE=real
case "${1:-}" in
    --dry-run) MODE=dry ;;
    --plan) MODE=plan ;;
    "") ;;
    *) echo "usage: $0 [--dry-run | --plan]" >&2; exit 2 ;;
esac

SUITE_BUDGET=480 # seconds of steps per device command (600 s limit: the rest is slack and transfers)
STEPS=(install cuda_tests model_step pretrain_throughput)
declare -A BUDGET=([install]=40 [cuda_tests]=110 [model_step]=170 [pretrain_throughput]=160)
total=0
for s in "${STEPS[@]}"; do total=$((total + BUDGET[$s])); done
if [ "$MODE" = plan ]; then
    printf '{"suite_budget": %d, "total": %d, "steps": [' "$SUITE_BUDGET" "$total"
    sep=""
    for s in "${STEPS[@]}"; do printf '%s{"name": "%s", "budget_s": %d}' "$sep" "$s" "${BUDGET[$s]}"; sep=", "; done
    printf ']}\n'
    exit 0
fi
if [ "$total" -gt "$SUITE_BUDGET" ]; then
    echo "the steps' budgets add to ${total} s, over the suite's ${SUITE_BUDGET} s" >&2
    exit 1
fi

export PYTHONUNBUFFERED=1
if [ "$MODE" = dry ]; then
    HOST_PYTHON=${HOST_PYTHON:-$REPO/.venv/bin/python}
    OUT=${OUT:-$REPO/build/gpu_dry_run}
    version=$("$HOST_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    BUNDLE=${BUNDLE:-$REPO/build/gpu_bundle}
    PYTHON="$HOST_PYTHON" bash "$REPO/scripts/gpu_bundle.sh" --python "$version" --out "$BUNDLE"
    export UNITER3M_GPU_DRY_RUN=1 # tests/gpu/test_cuda.py runs on the CPU
else
    HOST_PYTHON=${HOST_PYTHON:-python3}
    OUT=${OUT:-$REPO/gpu_out}
    BUNDLE=${BUNDLE:-$REPO/.gpu_bundle}
fi
[ -f "$BUNDLE/manifest.json" ] || { echo "no bundle at $BUNDLE: run scripts/gpu_bundle.sh first and carry it" >&2; exit 1; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/uniter3m_gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export UNITER3M_TEXT_MODEL="$BUNDLE/tokenizer" # what tiny_dbs and the benchmarks tokenise with
echo '[]' >"$OUT/steps.json"

# run_step NAME LOG COMMAND...: the command under its budget (dry run: 4x, for the slower CPU), timed
run_step() {
    local name=$1 log=$2 limit=${BUDGET[$1]} start rc=0
    shift 2
    [ "$MODE" = dry ] && limit=$((4 * limit))
    echo "== $name (budget ${BUDGET[$name]} s on the device)"
    start=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee -a "$log" || rc=$?
    "$HOST_PYTHON" - "$OUT/steps.json" "$name" "${BUDGET[$name]}" "$(($(date +%s) - start))" "$rc" <<'EOF'
import json, sys
path, name, budget, seconds, rc = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
steps = json.load(open(path)) + [{"name": name, "budget_s": budget, "seconds": seconds, "exit_code": rc}]
json.dump(steps, open(path, "w"), indent=2)
EOF
    if [ "$rc" -ne 0 ]; then
        echo "step $name failed (exit $rc; 124 = over its time limit): see $log" >&2
        exit "$rc"
    fi
}

# 1. a fresh venv that sees the host's packages (the image's CUDA torch) through a .pth file, not
#    --system-site-packages: python3 there is itself a venv (/opt/torch/.venv), whose packages a
#    nested venv's system site would not include. The bundle's wheels go into the venv, ahead of the host's.
install_bundle() {
    set -euo pipefail
    local py="$WORK/venv/bin/python" site
    cd "$WORK" # python puts the working directory first on sys.path: never the source tree
    "$HOST_PYTHON" -m venv --without-pip "$WORK/venv"
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$HOST_PYTHON" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
        >"$site/host_packages.pth"
    "$py" -m pip install -q --no-index --no-deps --ignore-installed --no-compile --no-warn-script-location \
        "$BUNDLE"/wheels/*.whl
    "$py" - "$REPO" <<'EOF'
"""The installed package, not the source tree, and every requirement of it satisfied."""
import importlib.metadata as md, sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
import torch
import uniter3m

where = Path(uniter3m.__file__).resolve()
if Path(sys.argv[1]).resolve() in where.parents:
    sys.exit(f"uniter3m resolves to the source tree ({where}), not the install")
import uniter3m.recipes.pretrain  # only an install maps the recipes
problems = []
for line in md.requires("uniter3m") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        problems.append(f"{req.name} is missing (add it to scripts/gpu_bundle.sh PINS)")
        continue
    if not req.specifier.contains(have, prereleases=True):
        problems.append(f"{req.name} {have} does not satisfy {req.specifier} (pin it in scripts/gpu_bundle.sh)")
if problems:
    sys.exit("the install lacks: " + "; ".join(problems))
print(f"uniter3m from {where.parent}; torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available: {torch.cuda.is_available()}); python {sys.version.split()[0]}")
EOF
    mkdir -p "$WORK/tree"
    cp -r "$REPO/tests" "$REPO/benchmarks" "$REPO/configs" "$REPO/pyproject.toml" "$WORK/tree/"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    cat "$BUNDLE/manifest.json"
} >"$OUT/environment.txt"
export REPO WORK BUNDLE HOST_PYTHON
run_step install "$OUT/environment.txt" bash -c "$(declare -f install_bundle); install_bundle"
PY="$WORK/venv/bin/python"
cd "$WORK/tree"

# 2. correctness on the device: bf16 and fp16 + GradScaler steps, compiled vs eager, packed vs unpacked
run_step cuda_tests "$OUT/cuda_tests.log" "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_cuda.py

# 3. the fixed-shape base step, interleaved rounds
if [ "$MODE" = dry ]; then
    step_args=(--device cpu --size tiny --batch 4 --text-len 6 --face-frames 4 --speech-frames 4
        --dtype fp32 --rounds 1 --steps 1 --warmup 1 --compile-backend aot_eager)
else
    step_args=(--size base --batch 128 --text-len 30 --face-frames 64 --speech-frames 64 --rounds 4 --steps 5)
fi
run_step model_step "$OUT/model_step.log" "$PY" benchmarks/model_step.py "${step_args[@]}" --json "$OUT/model_step.json"

# 4. real-length pretraining (synthetic corpus with MELD-like lengths), plain vs packed, MFU on real positions
if [ "$MODE" = dry ]; then
    pre_args=(--size tiny --device cpu --utterances 120 --rounds 2 --chunk 4 --log-every 2 --workers 1
        --max-tokens 1024)
else
    pre_args=(--size base --device cuda --utterances 3000 --rounds 2 --chunk 30 --log-every 10 --workers auto
        --max-tokens 16384)
fi
run_step pretrain_throughput "$OUT/pretrain_throughput.log" "$PY" benchmarks/pretrain_throughput.py "${pre_args[@]}" \
    --contenders plain,packed --tokenizer "$BUNDLE/tokenizer" --json "$OUT/pretrain_throughput.json"

echo "== all steps passed ($MODE run); results in $OUT"
cat "$OUT/steps.json"
