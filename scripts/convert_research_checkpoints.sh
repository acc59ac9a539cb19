#!/usr/bin/env bash
# Convert every model_step_N.pt of a UNITER or MEmoBERT run into uniter3m checkpoint folders.
#   scripts/convert_research_checkpoints.sh memobert|uniter SRC_DIR OUT_DIR [--model-config CONFIG.json]
# Writes OUT_DIR/step_N/ (config.json + model.safetensors + conversion_report.json) per file.
# Give --model-config (their model config JSON) when the head count is not hidden/64: state dicts
# do not record it; other flags (--allow-new PATTERN) pass through. A file that fails to convert
# stops the loop with uniter3m's error.
set -euo pipefail
KIND=${1:?usage: $0 memobert|uniter SRC_DIR OUT_DIR [--model-config CONFIG.json]}
SRC=${2:?usage: $0 memobert|uniter SRC_DIR OUT_DIR [--model-config CONFIG.json]}
OUT=${3:?usage: $0 memobert|uniter SRC_DIR OUT_DIR [--model-config CONFIG.json]}
shift 3
shopt -s nullglob
files=("$SRC"/model_step_*.pt)
if [[ ${#files[@]} -eq 0 ]]; then
  echo "no model_step_*.pt files in $SRC" >&2
  exit 2
fi
for pt in "${files[@]}"; do
  step=$(basename "$pt" .pt)
  step=${step#model_step_}
  echo "== $pt -> $OUT/step_$step"
  uniter3m convert --from "$KIND" --checkpoint "$pt" --out "$OUT/step_$step" --overwrite "$@"
done
