#!/bin/bash
# One IEMOCAP-4 fold-5 fine-tuning run of the task-adaptive pretraining comparison (issue 12 §4b).
#   benchmarks/tapt_finetune.sh INIT_NAME INIT_DIR FRACTION SEED [extra --set ...]
# e.g. benchmarks/tapt_finetune.sh minilm $TOK 0.1 1 --set epochs=10
# Writes runs/tapt_ft/<INIT_NAME>_f<FRACTION>_s<SEED>/ and logs_tapt/<same>.log (with CPU times).
set -euo pipefail
name=$1 init=$2 frac=$3 seed=$4
shift 4
out=runs/tapt_ft/${name}_f${frac}_s${seed}
mkdir -p logs_tapt
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
/usr/bin/time -f "cpu_user_s %U cpu_sys_s %S wall_s %e" .venv/bin/uniter3m finetune \
    --config configs/downstream/iemocap4_loso.json --fold 4 \
    --set model.init="$init" --set protocol.train_fraction="$frac" --set protocol.subset_seed=0 \
    --set seed="$seed" --set output_dir="$out" "$@" > "logs_tapt/${name}_f${frac}_s${seed}.log" 2>&1
