#!/usr/bin/env bash
# Pretrain on N GPUs of one machine (or N CPU processes with gloo) with torchrun.
#   scripts/pretrain_torchrun.sh configs/pretrain/memobert_base.json [--set key=value ...]
# Env: NPROC (default: number of GPUs, else 2), NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT for several machines.
# A rerun of the same command continues from the last complete checkpoint (--resume auto).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.json [--set key=value ...]}
shift
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
NNODES=${NNODES:-1}
if [[ "$NNODES" == 1 ]]; then
  RDZV=(--standalone)
else
  RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
fi
# one CPU thread per process unless told otherwise: the DataLoader workers need the cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m torch.distributed.run "${RDZV[@]}" --nproc_per_node "$NPROC" \
  -m uniter3m.cli pretrain --config "$CONFIG" --resume auto "$@"
