#!/usr/bin/env bash
# The GPU checks of one lent session, most important first, each under its own time limit so that
# the whole fits a short lease (the limits of steps 1-4 add up to 8 min 5 s, steps 5 and 6 get what is left of 8 min 20 s;
# results written row by row).
# Results and logs go to $OUT (default benchmarks/results).
#
# Before the lease, on the developer's machine: `bash benchmarks/prepare_gpu_run.sh` copies nanochat's
# reference code to .ref/ and torchao's wheel to .whl/ and prints the call to make:
#   run(command="ONECARD_COMMIT=<hash> OUT=$OUT bash benchmarks/run_on_gpu.sh", carry=[".ref", ".whl"])
# (the copy on the device has no git history: ONECARD_COMMIT records what was measured).
#
# Time limits come from the earlier leases' logs (benchmarks/results/gpu_session2): a fresh compile of
# d20 and two steps took more than 55 s, so each compiled measurement gets minutes, not seconds.
set -u
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log=$out/gpu_session.log
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
ref=${ONECARD_NANOCHAT_REFERENCE:-.ref/nanochat-fae3aca}
[ -f "$ref/nanochat/gpt.py" ] || ref=shared/reference/nanochat-fae3aca
{ date -u; git rev-parse --verify -q HEAD 2>/dev/null || echo "commit ${ONECARD_COMMIT:-unknown}";
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch; print('torch', torch.__version__)";
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>/dev/null || echo "torchao missing: lean-fp8 rows will say so";
  [ -f "$ref/nanochat/gpt.py" ] && echo "nanochat reference: $ref" || echo "MISSING nanochat reference ($ref): step 1 cannot run"; } 2>&1 | tee "$log"

echo "== 1. onecard against nanochat's own code, compiled, d20 micro-batch 32 (issue 9 target 1)" | tee -a "$log"
# both compiled from scratch (each prints its first step's seconds as it goes), then each again alone for
# its memory peak; the speed rows are written before the memory ones, so a cut leaves them
timeout 230 python3 benchmarks/vs_nanochat.py --device cuda --depth 20 --micro-batch 32 --rounds 6 --warmup 2 \
  --recipes baseline --reference "$ref" --out "$out" 2>&1 | tee -a "$log"

echo "== 2. d32 under a 12 GiB cap, compiled: lean-fp8 against lean (MFU target, fp8 speedup)" | tee -a "$log"
timeout 170 python3 benchmarks/recipes_gpu.py --depths 32 --caps 12 --steps 2 --accum 1 --compile --out "$out" \
  --recipes lean-fp8 lean 2>&1 | tee -a "$log"

echo "== 3. offload-states on a GPU for the first time (eager, d32 under 12 GiB)" | tee -a "$log"
timeout 60 python3 benchmarks/recipes_gpu.py --depths 32 --caps 12 --steps 2 --accum 1 --no-compile --out "$out" \
  --recipes offload-states 2>&1 | tee -a "$log"

echo "== 4. asynchronous grads=cpu folding on CUDA: bit-identity" | tee -a "$log"
python3 -c "import pytest" 2>/dev/null || echo "pytest missing (prepare_gpu_run.sh carries it in .whl)" | tee -a "$log"
timeout 25 python3 -m pytest -q -p no:cacheprovider tests/test_grad_fold.py -k cuda 2>&1 | tail -3 | tee -a "$log"

echo "== 5. if time is left: offload compiled block by block (d32 under 8 GiB, the 8 GB plan's recipe)" | tee -a "$log"
# never run on CUDA before: each block's backward hands its gradients to the folding thread as it ends
left=$((500 - SECONDS))  # the whole script stays under 8 min 20 s
if [ "$left" -ge 45 ]; then
  timeout "$left" python3 benchmarks/recipes_gpu.py --depths 32 --caps 8 --steps 2 --accum 1 --compile --out "$out" \
    --recipes offload 2>&1 | tee -a "$log"
else
  echo "skipped: ${left} s left" | tee -a "$log"
fi

echo "== 6. if time is left: what an eager step holds at its peak, by source line (docs/memory.md#activations)" | tee -a "$log"
left=$((500 - SECONDS))
if [ "$left" -ge 25 ]; then
  timeout "$left" python3 benchmarks/memory_trace.py --depth 20 --recipe lean --micro-batch 16 --out "$out" 2>&1 \
    | tee -a "$log"
else
  echo "skipped: ${left} s left" | tee -a "$log"
fi
date -u | tee -a "$log"
