#!/usr/bin/env bash
# Issue 23's GPU runs in one device call: Flan-T5-XL widths, 350 tokens in, the engine before
# issue 23 ("reference") and with its per-shape attention choice ("auto"), same card, same call.
# Results land in $OUT (or ./out): one file per run, its log with the JSON line last. Each run has its own time
# limit so that a slow one costs only its own numbers.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
G="python3 bench/gpu.py --impl jax --model flan-t5-xl --input-len 350 --output-len 8,74,128 --repeats 3"
E="python3 bench/engine_parts.py --model flan-t5-xl --batches 128 --input-len 350 --skip-micro"
run() {  # name seconds command...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; echo "$name rc $?"
}
run gpu-ref-128 ${T128:-140} $G --batches 128 --attention reference --no-check
run gpu-auto-128 ${T128A:-160} $G --batches 128 --attention auto
[ "${ONLY_128:-0}" = 1 ] || {  # ONLY_128=1: the two batch-128 runs alone (a short lease)
run parts-auto-128 110 $E --attention auto
run parts-ref-128 100 $E --attention reference
run gpu-ref-32-64 ${T3264:-100} $G --batches 32,64 --attention reference --no-check
run gpu-auto-32-64 ${T3264:-100} $G --batches 32,64 --attention auto --no-check
}
for f in "$OUT"/*.txt; do
  echo "== $f"; grep -E "^\||jax batch|check:|against the bounds|kernels in|encoder attention|Error" "$f" | cut -c1-700
done
