#!/usr/bin/env bash
# IEMOCAP fold loop: leave-one-session-out (5 folds) or leave-one-speaker-out (10 folds).
#   scripts/finetune_iemocap.sh [session|speaker] [--set key=value ...]
# e.g. scripts/finetune_iemocap.sh speaker --set model.init=/path/to/checkpoint
# Writes runs/iemocap4_{loso,speaker}/fold*/metrics.json and summary.{csv,md,json} + confusion.png.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/_fold_loop.sh"
scheme=${1:-session}
[ $# -gt 0 ] && shift
case $scheme in
    session) fold_loop configs/downstream/iemocap4_loso.json 5 "$@" ;;
    speaker) fold_loop configs/downstream/iemocap4_speaker.json 10 "$@" ;;
    *) echo "usage: $0 [session|speaker] [--set key=value ...]" >&2; exit 2 ;;
esac
