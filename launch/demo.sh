#!/usr/bin/env bash
# CPU demo: build a tiny real-format MoE checkpoint (qwen2_moe, random weights), write a request
# file, and serve it with a 3-stage pipeline under torchrun. Everything lands in $DEMO_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DEMO_DIR:-runs/demo}
rm -rf "$D" && mkdir -p "$D"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== building a tiny qwen2_moe checkpoint in $D/ckpt"
python tools/make_checkpoint.py --family qwen2_moe --out "$D/ckpt" 2>&1 | grep -v "Writing model"
python tools/make_requests.py --n 24 --vocab 384 --prompt-len 4:48 --max-new 8:32 --sampled 0.25 --out "$D/requests.jsonl"
echo '{"id": "text", "prompt": "A mixture of experts routes every token", "max_new_tokens": 12}' >> "$D/requests.jsonl"

echo "== serving 25 requests with 3 pipeline stages (torchrun --nproc-per-node 3)"
torchrun --standalone --nproc-per-node 3 -m dejavu_py --config configs/tiny-cpu.yaml \
    --model "$D/ckpt" --prompts "$D/requests.jsonl" --run-dir "$D/run" 2>&1 | grep -v "^W[0-9]\{4\}\|OMP_NUM\|\*\*\*\*"

echo "== workers ($D/run/workers.json)"
python - "$D/run" <<'PY'
import json, sys
doc = json.load(open(f"{sys.argv[1]}/workers.json"))
for w in doc["workers"]:
    print(f"  {w['name']}: stage {w['stage']} layers {w['layers'][0]}..{w['layers'][1]} rank {w['rank']} pid {w['pid']} on {w['device']}")
outs = [json.loads(l) for l in open(f"{sys.argv[1]}/outputs.jsonl")]
print(f"== {sum('output_ids' in o for o in outs)}/{len(outs)} requests done; two of them:")
for o in (outs[0], outs[-1]):
    print("  ", json.dumps({k: o[k] for k in ("id", "output_ids", "text", "finish_reason") if k in o}))
PY
