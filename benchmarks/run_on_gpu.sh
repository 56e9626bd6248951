#!/usr/bin/env bash
# The GPU checks of one lent session, most important first, each under its own time limit so that
# the whole fits a short lease. Results and logs go to $OUT (default benchmarks/results).
#
#   OUT=benchmarks/results bash benchmarks/run_on_gpu.sh
#   ONECARD_COMMIT=<hash> ...   where the copy has no git, to record what was measured
#
# Needs PyTorch with CUDA; rustbpe and torchao may come as wheels in .whl/ (installed to /tmp/site).
set -u
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log=$out/gpu_session.log
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ date -u; git rev-parse HEAD 2>/dev/null || echo "commit ${ONECARD_COMMIT:-unknown}"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee "$log"

echo "== 1. onecard train on CUDA: the planner's pick for 12 GiB, checkpoint, meters, predicted vs measured" | tee -a "$log"
timeout 60 python3 -m onecard.cli train --model d20 --vram 12GB --vocab-size 8192 --tokenizer-chars 5000000 \
  --steps 4 --total-batch 65536 --eval-every 0 --eval-batches 2 --run-dir /tmp/run --price 0.15 2>&1 | tee -a "$log"
cp /tmp/run/summary.json "$out/train_d20_summary.json" 2>/dev/null
cp /tmp/run/log.jsonl "$out/train_d20_log.jsonl" 2>/dev/null

echo "== 2. d32 under 8 and 12 GiB caps" | tee -a "$log"
timeout 160 python3 benchmarks/recipes_gpu.py --depths 32 --caps 8 12 --steps 2 --budget-s 130 --out "$out" \
  --recipes offload offload-max lean lean-fp8 2>&1 | tee -a "$log"

echo "== 3. d20 under 12 and 8 GiB caps" | tee -a "$log"
timeout 100 python3 benchmarks/recipes_gpu.py --depths 20 --caps 12 8 --steps 2 --budget-s 80 --out "$out" \
  --recipes lean offload offload-max bf16 recompute baseline 2>&1 | tee -a "$log"

echo "== 4. torch.compile: d20 under 12 GiB" | tee -a "$log"
timeout 60 python3 benchmarks/recipes_gpu.py --depths 20 --caps 12 --steps 2 --budget-s 30 --compile --out "$out" \
  --recipes lean-fp8 lean 2>&1 | tee -a "$log"
date -u | tee -a "$log"
