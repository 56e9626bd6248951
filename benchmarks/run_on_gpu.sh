#!/usr/bin/env bash
# The GPU checks of one lent session, most important first, each under its own time limit so that
# the whole fits a short lease (the limits add up to 7 min 40 s, and a fifth step runs in what is left
# of 7 min 55 s; results written row by row).
# Results and logs go to $OUT (default benchmarks/results).
#
#   OUT=benchmarks/results bash benchmarks/run_on_gpu.sh
#   ONECARD_COMMIT=<hash> ...   where the copy has no git, to record what was measured
#
# Needs PyTorch with CUDA; rustbpe and torchao may come as wheels in .whl/ (installed to /tmp/site).
# nanochat's reference code travels in shared/reference where the checkout has it (vs_nanochat).
set -u
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log=$out/gpu_session.log
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
ref=${ONECARD_NANOCHAT_REFERENCE:-shared/reference/nanochat-fae3aca}
{ date -u; git rev-parse HEAD 2>/dev/null || echo "commit ${ONECARD_COMMIT:-unknown}"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee "$log"

echo "== 1. onecard against nanochat's own code, compiled, d20 micro-batch 32 (issue 9 target 1)" | tee -a "$log"
# each is compiled from scratch on a fresh machine, then again alone for its memory peak; the speed
# rows are written before the memory ones, so a cut leaves them
timeout 200 python3 benchmarks/vs_nanochat.py --device cuda --depth 20 --micro-batch 32 --rounds 6 --warmup 2 \
  --recipes baseline --reference "$ref" --out "$out" 2>&1 | tee -a "$log"

echo "== 2. d32 under 12 and 8 GiB caps, compiled: offload-states for the first time, lean, lean-fp8" | tee -a "$log"
timeout 130 python3 benchmarks/recipes_gpu.py --depths 32 --caps 12 8 --steps 2 --budget-s 115 --compile --out "$out" \
  --recipes offload-states lean lean-fp8 offload 2>&1 | tee -a "$log"

echo "== 3. asynchronous grads=cpu folding on CUDA: bit-identity (the d32 offload rows of step 2 time it)" | tee -a "$log"
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_grad_fold.py -k cuda 2>&1 | tail -3 | tee -a "$log"

echo "== 4. eager against compiled, d20 under 12 GiB (fits benchmarks/fit_planner.py's compiled constants)" | tee -a "$log"
for mode in --no-compile --compile; do
  timeout 45 python3 benchmarks/recipes_gpu.py --depths 20 --caps 12 --steps 2 --budget-s 38 --out "$out" \
    --recipes lean baseline $mode 2>&1 | tee -a "$log"
done
echo "== 5. if time is left: what an eager step holds at its peak, by source line (docs/memory.md#activations)" | tee -a "$log"
left=$((475 - SECONDS))  # the whole script stays under 8 minutes
if [ "$left" -ge 25 ]; then
  timeout "$left" python3 benchmarks/memory_trace.py --depth 20 --recipe lean --micro-batch 16 --out "$out" 2>&1 \
    | tee -a "$log"
else
  echo "skipped: ${left} s left" | tee -a "$log"
fi
date -u | tee -a "$log"
