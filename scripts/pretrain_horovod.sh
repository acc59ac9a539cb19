#!/usr/bin/env bash
# Pretrain with Horovod (gloo controller) instead of torch.distributed; the code picks the
# Horovod backend by itself when horovodrun starts it. Build Horovod first: scripts/install_horovod.sh
#   scripts/pretrain_horovod.sh configs/pretrain/memobert_base.json [--set key=value ...]
# Env: NPROC (default: number of GPUs, else 2), HOSTS (default localhost:NPROC).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.json [--set key=value ...]}
shift
command -v horovodrun >/dev/null || { echo "horovodrun not found: run scripts/install_horovod.sh" >&2; exit 2; }
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
HOSTS=${HOSTS:-localhost:$NPROC}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec horovodrun -np "$NPROC" -H "$HOSTS" --gloo \
  python -m uniter3m.cli pretrain --config "$CONFIG" --resume auto "$@"
