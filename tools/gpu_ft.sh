#!/usr/bin/env bash
# Fault tolerance on a GPU with the OLMoE-1B-7B shapes, 2 stages sharing one GPU:
#   1. recovery of a stage killed mid-run: a cold replacement, then a standby with the stage preloaded
#      (replicas in shared memory, the default), and the same with replicas sent over the socket
#   2. tools/bench_serve.py: colocated vs disaggregated on the same trace
#   3. tools/bench_ft.py: FT off/on, without/with kills
# Results go to $OUT (default out/gpu-ft). Usage: bash tools/gpu_ft.sh [recovery|serve|ft|all]
# A quick check of the script itself on a CPU: DEVICE=cpu CK_ARGS="--family olmoe" N=16 bash tools/gpu_ft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out/gpu-ft}; WORK=${WORK:-/dev/shm/gpu-ft}; CK=${CK:-/dev/shm/olmoe}
mkdir -p "$OUT" "$WORK"
what=${1:-all}
DEVICE=${DEVICE:-cuda}; N=${N:-120}
CK_ARGS=${CK_ARGS:---config configs/models/olmoe-1b-7b.json --dtype bfloat16 --init-device cuda --no-tokenizer}
[ -f "$CK/config.json" ] || python tools/make_checkpoint.py $CK_ARGS --out "$CK" 2>&1 | tail -1
VOCAB=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$CK/config.json")
DTYPE=${DTYPE:-bfloat16}
RUN=(--model "$CK" --device "$DEVICE" --dtype "$DTYPE" --ignore-eos --max-batch-size 64 --max-batch-tokens 8192
     --kv-capacity-tokens 65536 --max-model-len 512 --no-progress)

if [ "$what" = recovery ] || [ "$what" = all ]; then
  python tools/make_requests.py --n $((N / 2)) --vocab "$VOCAB" --prompt-len 128 --max-new 256 --seed 5 --out "$WORK/req.jsonl"
  for mode in ${MODES:-cold preloaded preloaded-socket}; do  # -socket: replicas in pinned memory, bytes over TCP
    extra=(); [[ $mode = preloaded* ]] && extra=(--standby 2 --standby-preload)
    [[ $mode = *-socket ]] && extra+=(--replica-shm-dir off)
    rm -rf "$WORK/rec-$mode"; mkdir -p "$WORK/rec-$mode"
    python -m dejavu_py --nproc-per-node 2 "${RUN[@]}" --prompts "$WORK/req.jsonl" --run-dir "$WORK/rec-$mode" \
        "${extra[@]}" > "$WORK/rec-$mode.log" 2>&1 &
    job=$!
    python tools/inject_fault.py --run-dir "$WORK/rec-$mode" --name s1 --after-tokens $((N * 30)) --timeout 300
    wait $job
    python - "$WORK/rec-$mode" "$OUT/recovery-$mode.json" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "tools")
from bench_ft import kill_to_token
run, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = lambda f: [json.loads(x) for x in (run / f).read_text().splitlines()]
doc = {"faults": rows("faults.jsonl"), "recoveries": rows("recoveries.jsonl"),
       "summary": json.loads((run / "summary.json").read_text())}
doc["kill_to_next_token_s"] = kill_to_token(doc["faults"], doc["recoveries"])
out.write_text(json.dumps(doc, indent=1) + "\n")
print(out.name, "kill to next token:", doc["kill_to_next_token_s"], "phases:", [r["phases"] for r in doc["recoveries"]])
PY
  done
fi
if [ "$what" = serve ] || [ "$what" = all ]; then
  python tools/bench_serve.py --ckpt "$CK" --device "$DEVICE" --nproc 2 --prompt-stages 1 --n "$N" --rate 6 \
      --max-prompt 1024 --max-output 256 --dtype "$DTYPE" --timeout 200 --work "$WORK/serve" --out "$OUT/bench-serve-olmoe-1b-7b.json" \
      --dejavu-arg=--max-batch-size=64 --dejavu-arg=--max-model-len=1280 2>&1 | tail -12
fi
if [ "$what" = ft ] || [ "$what" = all ]; then
  python tools/bench_ft.py --ckpt "$CK" --device "$DEVICE" --nproc 2 --n "$N" --rate 8 --max-prompt 512 --max-output 256 --dtype "$DTYPE" \
      --mtbf 4 --faults 2 --role stage --timeout 200 \
      --ft-on-arg=--standby=2 --ft-on-arg=--standby-preload --work "$WORK/ft" --out "$OUT/bench-ft-olmoe-1b-7b.json" \
      --dejavu-arg=--max-batch-size=64 --dejavu-arg=--max-model-len=768 2>&1 | tail -12
fi
