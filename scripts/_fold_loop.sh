# Shared by the fold-loop scripts: run every fold of CONFIG in its own process, then the summary.
# Usage (from a wrapper): fold_loop CONFIG NFOLDS [--set key=value ...]
# The configs read db/<corpus>_* (build them with `python -m uniter3m.recipes.build_lmdb.corpora
# {meld,iemocap,mosi} --data ../shared/data --tokenizer TOK --out db`) and start from
# models/all-MiniLM-L6-v2: pass --set model.init=DIR for another (or the same) starting point.
# LAUNCH picks the launcher, e.g. LAUNCH="torchrun --nproc_per_node=4 -m uniter3m.cli" (default: uniter3m).
set -euo pipefail
fold_loop() {
    local config=$1 nfolds=$2
    shift 2
    local launch=${LAUNCH:-uniter3m}
    for ((k = 0; k < nfolds; k++)); do
        echo "=== $config: fold $k of $nfolds ==="
        $launch finetune --config "$config" --fold "$k" "$@"
    done
    uniter3m finetune --config "$config" --summarize "$@"
}
