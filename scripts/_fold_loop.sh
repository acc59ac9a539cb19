# Shared by the fold-loop scripts: run every fold of CONFIG in its own process, then the summary.
# Usage (from a wrapper): fold_loop CONFIG NFOLDS [--set key=value ...]
# The configs read db/<corpus>_* (build them with `uniter3m corpora
# {meld,iemocap,mosi,emodb} --data ../shared/data --tokenizer TOK --out db`) and start from
# models/all-MiniLM-L6-v2: pass --set model.init=DIR for another (or the same) starting point.
# LAUNCH picks the launcher, e.g. LAUNCH="torchrun --nproc_per_node=4 -m uniter3m.cli" (default: uniter3m).
# SEEDS="1 2 3" runs every fold once per seed into <output_dir>/seed<S>/ (each with its own summary)
# and writes <output_dir>/seeds_summary.{md,json} with `uniter3m summary`: per metric, each seed's
# fold mean and the mean ± sample std (ddof 1) over seeds. Without SEEDS: one run with the config's seed.
set -euo pipefail
fold_loop() {
    local config=$1 nfolds=$2
    shift 2
    local launch=${LAUNCH:-uniter3m}
    if [ -z "${SEEDS:-}" ]; then
        for ((k = 0; k < nfolds; k++)); do
            echo "=== $config: fold $k of $nfolds ==="
            $launch finetune --config "$config" --fold "$k" "$@"
        done
        uniter3m finetune --config "$config" --summarize "$@"
        return
    fi
    local base
    base=${OUT:-$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["output_dir"])' "$config")}
    for seed in $SEEDS; do
        for ((k = 0; k < nfolds; k++)); do
            echo "=== $config: seed $seed, fold $k of $nfolds ==="
            $launch finetune --config "$config" --fold "$k" "$@" --set seed="$seed" --set output_dir="$base/seed$seed"
        done
        uniter3m finetune --config "$config" --summarize "$@" --set output_dir="$base/seed$seed"
    done
    local runs=()
    for seed in $SEEDS; do runs+=("$base/seed$seed"); done
    uniter3m summary "${runs[@]}" --out "$base"
}
