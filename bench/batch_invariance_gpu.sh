#!/usr/bin/env bash
# Issue 22 on one GPU (the device machine: no Ray, no package registry). Carried wheels in .whl
# (nvidia-pytriton, tritonclient with its http extra (gevent, geventhttpclient), tenacity: what
# serving.tritonserver and the Triton model import). Writes raw output under $OUT (or ./out).
#   STEPS="served served-cost" bash bench/batch_invariance_gpu.sh
#   STEPS="cost" bash bench/batch_invariance_gpu.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  # into the interpreter itself: tritonserver's Python stub does not inherit PYTHONPATH
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; date -u; } \
  >> "$OUT/device.txt" 2>&1
for step in ${STEPS:-served served-cost cost}; do
  case $step in
    served) cmd="bench/batch_invariance.py served --model small" ;;
    served-cost) cmd="bench/batch_invariance.py served-cost --model mid --rows 2048 --repeats 2 --request-rows 8,128 --invariant-request-rows 8,128" ;;
    served-cost-128) cmd="bench/batch_invariance.py served-cost --model mid --rows 2048 --repeats 2 --request-rows 8,128 --invariant-request-rows 128" ;;
    cost) cmd="bench/batch_invariance.py cost --model mid --rows 11334 --batch 128 --repeats 2 --fixed-batch 128,32" ;;
    cost-8) cmd="bench/batch_invariance.py cost --model mid --rows 1024 --batch 8 --repeats 1 --fixed-batch 128,32,8" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "\$ python3 $cmd" | tee -a "$OUT/$step.log"
  start=$(date +%s)
  # shellcheck disable=SC2086
  python3 $cmd 2>>"$OUT/$step.log" | tee "$OUT/$step.jsonl"
  echo "rc ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s" | tee -a "$OUT/$step.log"
done
