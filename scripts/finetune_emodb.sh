#!/usr/bin/env bash
# EmoDB leave-one-speaker-out (10 folds; validation = the next speaker, never the test one).
#   SEEDS="1 2 3" scripts/finetune_emodb.sh [speech|func|text|cases] [--set key=value ...]
# speech: configs/downstream/emodb_loso.json (ComParE LLD frames, pooled by 10, per-speaker z-scored)
# func: + the ComParE functionals frame; text: + the sentence; cases: text + speech, modality_sets L,A,LA.
# Build the databases first: uniter3m corpora emodb --data ../shared/data \
#   --tokenizer TOK --out db --split-dbs --pool-frames 10 --speaker-norm --functionals
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/_fold_loop.sh"
variant=${1:-speech}
[ $# -gt 0 ] && shift
case $variant in
    speech) fold_loop configs/downstream/emodb_loso.json 10 "$@" ;;
    func) fold_loop configs/downstream/emodb_loso_func.json 10 "$@" ;;
    text) fold_loop configs/downstream/emodb_loso_la.json 10 "$@" ;;
    cases) fold_loop configs/downstream/emodb_loso_cases.json 10 "$@" ;;
    *) echo "usage: $0 [speech|func|text|cases] [--set key=value ...]" >&2; exit 2 ;;
esac
