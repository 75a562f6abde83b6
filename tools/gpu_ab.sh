#!/usr/bin/env bash
# Two code trees side by side on one GPU, on the same checkpoint and workload: decode tokens/s of
# tools/bench.py (1 and 2 stages) and FT's cost (tools/bench_ft_cost.py), each tree with its own tools,
# alternating A, B, B, A so that drift over the runs weighs on both alike.
#   bash tools/gpu_ab.sh bench MODEL A_DIR B_DIR   MODEL: a file of configs/models/ (olmoe-1b-7b, ...)
#   bash tools/gpu_ab.sh ftcost MODEL A_DIR B_DIR
# A_DIR/B_DIR: roots of the two trees (e.g. an export of an older commit, and .). Results: $OUT (default
# out/gpu-ab), one JSON per tree and run; tools/ab_summary.py puts them side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
what=$1 MODEL=$2 A=$(realpath "$3") B=$(realpath "$4")
OUT=$(realpath -m "${OUT:-out/gpu-ab}"); CK=${CK:-/dev/shm/$MODEL}; BATCHES=${BATCHES:-1,64}; REPEAT=${REPEAT:-1}
mkdir -p "$OUT"
[ -f "$CK/config.json" ] || PYTHONPATH=$B python "$B/tools/make_checkpoint.py" --config "configs/models/$MODEL.json" \
    --dtype bfloat16 --init-device cuda --no-tokenizer --out "$CK" 2>&1 | tail -1
run() {  # tree-dir tag rep
  local dir=$1 tag=$2 rep=$3
  if [ "$what" = bench ]; then
    (cd "$dir" && PYTHONPATH=$dir python tools/bench.py --model-config "configs/models/$MODEL.json" --ckpt "$CK" \
        --work "/dev/shm/ab-$tag" --stages 1,2 --batches "$BATCHES" --no-transformers \
        --out "$OUT/bench-$MODEL-$tag-$rep.json") 2>&1 | grep -v '^{' || true
  else
    (cd "$dir" && PYTHONPATH=$dir python tools/bench_ft_cost.py --model-config "configs/models/$MODEL.json" --ckpt "$CK" \
        --work "/dev/shm/ab-$tag" --stages 2 --batches "$BATCHES" --new-tokens 256 --repeat 2 \
        --out "$OUT/ftcost-$MODEL-$tag-$rep.json") 2>&1 | tail -4
  fi
}
if [ "$what" = bench ]; then  # a discarded warm-up: kernels compile on first use, into a cache both trees share
  (cd "$B" && PYTHONPATH=$B python tools/bench.py --model-config "configs/models/$MODEL.json" --ckpt "$CK" \
      --work /dev/shm/ab-warm --stages 1 --batches 1 --new-tokens 16 --no-transformers --out /dev/shm/ab-warm.json) >/dev/null 2>&1 || true
fi
for rep in $(seq 1 "$REPEAT"); do
  if [ $((rep % 2)) = 1 ]; then run "$A" a "$rep"; run "$B" b "$rep"; else run "$B" b "$rep"; run "$A" a "$rep"; fi
done
