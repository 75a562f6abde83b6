#!/usr/bin/env bash
# GPU check of the pipeline against transformers on one GPU (stages share it):
#  1. float32, OLMoE-1B-7B shapes (or $MODEL's) cut to 4 layers and 16 experts: greedy must be token-exact, 1 and 2 stages;
#  2. bfloat16, the real OLMoE-1B-7B shapes: match rate of the first 32 tokens, 1 and 2 stages.
# Results (JSON) go to $OUT (default out/gpu-parity). Usage: bash tools/gpu_parity.sh [small|full|all]
# MODEL=qwen1.5-moe-a2.7b (a file of configs/models/, default olmoe-1b-7b) checks those shapes instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out/gpu-parity}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"
what=${1:-all}
MODEL=${MODEL:-olmoe-1b-7b}
CONFIG=configs/models/$MODEL.json
VOCAB=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$CONFIG")

run_case() {  # name dtype ckpt-args...
  local name=$1 dtype=$2; shift 2
  python tools/make_checkpoint.py --config "$CONFIG" "$@" --dtype "$dtype" \
      --init-device cuda --no-tokenizer --out "$WORK/$name"
  python tools/make_requests.py --n 16 --vocab "$VOCAB" --prompt-len 4:96 --max-new 32 --seed 1 --out "$WORK/$name.jsonl"
  for n in 1 2; do
    python -m dejavu_py --nproc-per-node $n --config configs/olmoe-1b-7b-1gpu.yaml --model "$WORK/$name" \
        --prompts "$WORK/$name.jsonl" --dtype "$dtype" --run-dir "$WORK/run-$name-$n" \
        --output "$OUT/$name-$n-stages.jsonl" --max-batch-size 8 --no-progress
    cp "$WORK/run-$name-$n/summary.json" "$OUT/$name-$n-stages-summary.json"
    python tools/compare_hf.py --model "$WORK/$name" --prompts "$WORK/$name.jsonl" \
        --outputs "$OUT/$name-$n-stages.jsonl" --dtype "$dtype" --device cuda --first 32 \
        --json "$OUT/parity-$name-$n-stages.json"
  done
}

if [ "$what" = small ] || [ "$what" = all ]; then
  run_case "$MODEL-small-fp32" float32 --set num_hidden_layers=4 --set num_experts=16
fi
if [ "$what" = full ] || [ "$what" = all ]; then
  run_case "$MODEL-bf16" bfloat16
fi
