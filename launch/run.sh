#!/usr/bin/env bash
# Launch dejavu_py with torchrun.
#
#   Single node, one process per pipeline stage:
#     bash launch/run.sh 3 --config configs/tiny-cpu.yaml --model CKPT --prompts req.jsonl --run-dir runs/x
#
#   Several nodes (run the same line on every node; NODE_RANK 0..NNODES-1, MASTER_ADDR = node 0):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash launch/run.sh 4 --model CKPT --prompts req.jsonl --run-dir runs/x
#   Stages are placed in rank order: node 0 holds ranks 0..3, node 1 ranks 4..7; each rank uses the
#   GPU of its local rank. With --prompt-stages P the first P ranks are prompt stages.
set -euo pipefail
cd "$(dirname "$0")/.."
nproc=${1:?usage: launch/run.sh PROCESSES_PER_NODE [dejavu_py flags...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "${NNODES:-1}" -gt 1 ]; then
  exec torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" \
      --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
      --rdzv-id "${RDZV_ID:-dejavu}" --nproc-per-node "$nproc" -m dejavu_py "$@"
fi
exec torchrun --standalone --nproc-per-node "$nproc" -m dejavu_py "$@"
