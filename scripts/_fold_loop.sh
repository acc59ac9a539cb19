# Shared by the fold-loop scripts: run every fold of CONFIG in its own process, then the summary.
# Usage (from a wrapper): fold_loop CONFIG NFOLDS [--set key=value ...]
# The configs read db/<corpus>_* (build them with `python -m uniter3m.recipes.build_lmdb.corpora
# {meld,iemocap,mosi,emodb} --data ../shared/data --tokenizer TOK --out db`) and start from
# models/all-MiniLM-L6-v2: pass --set model.init=DIR for another (or the same) starting point.
# LAUNCH picks the launcher, e.g. LAUNCH="torchrun --nproc_per_node=4 -m uniter3m.cli" (default: uniter3m).
# SEEDS="1 2 3" runs every fold once per seed into <output_dir>/seed<S>/ (each with its own summary)
# and writes <output_dir>/seeds_summary.{md,json}: per metric, the mean ± std over seeds of the
# fold means. Without SEEDS: one run with the config's seed, as before.
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
    python - "$base" $SEEDS <<'PY'
import json, sys
from pathlib import Path

import numpy as np

base, seeds = Path(sys.argv[1]), sys.argv[2:]
fold_means = {}
for seed in seeds:
    folds = [json.loads(p.read_text())["test"] for p in sorted((base / f"seed{seed}").glob("fold*/metrics.json"))]
    for name in folds[0] if folds else []:
        if not isinstance(folds[0][name], list):
            fold_means.setdefault(name, []).append(float(np.mean([f[name] for f in folds])))
rows = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v} for k, v in fold_means.items()}
lines = [f"seeds {' '.join(seeds)}: mean ± std over seeds of the fold means", "", "| metric | mean ± std | per seed |", "|---|---|---|"]
lines += [f"| {k} | {r['mean']:.2f} ± {r['std']:.2f} | {', '.join(f'{x:.2f}' for x in r['per_seed'])} |" for k, r in rows.items()]
(base / "seeds_summary.md").write_text("\n".join(lines) + "\n")
(base / "seeds_summary.json").write_text(json.dumps(rows, indent=1))
print("\n".join(lines))
PY
}
