#!/usr/bin/env bash
# MSP-IMPROV 4-class fold loop: 12 folds (6 sessions x 2 speakers; test one speaker, validate on
# the other speaker of that session).
#   scripts/finetune_msp.sh [--set key=value ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/_fold_loop.sh"
fold_loop configs/downstream/msp4.json 12 "$@"
