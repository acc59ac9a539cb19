#!/usr/bin/env bash
# MELD, official train/dev/test split (one fold): 7 emotions by default,
#   scripts/finetune_meld.sh --set protocol.target=sentiment   for the 3 sentiments.
# Selects on dev weighted F1, scores test once; writes runs/meld_text/summary.{csv,md} + confusion.png.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/_fold_loop.sh"
fold_loop configs/downstream/meld_text.json 1 "$@"
