#!/usr/bin/env bash
# Run on the developer's machine (which reaches the package registries) before a lent GPU session:
# it puts what benchmarks/run_on_gpu.sh needs and the device machine lacks into two folders that git
# ignores and the device's `run` carries:
#   .ref/nanochat-fae3aca   nanochat's reference code, for vs_nanochat.py (the ../shared beside a
#                           checkout does not travel)
#   .whl/                   torchao 0.18.0 (ran with the device's torch 2.11 on 2026-11-26), for lean-fp8,
#                           and pytest with the four packages it needs (pure Python), for step 4's CUDA test
# and prints the `run` call to make.
#
#   bash benchmarks/prepare_gpu_run.sh [PATH to nanochat at fae3aca; default ../shared/reference/nanochat-fae3aca]
set -eu
cd "$(git rev-parse --show-toplevel)"
for ignored in /.ref/ /.whl/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done
ref=${1:-../shared/reference/nanochat-fae3aca}
if [ ! -f "$ref/nanochat/gpt.py" ]; then
  echo "nanochat's reference code is not at $ref: give its path" >&2
  exit 2
fi
rm -rf .ref/nanochat-fae3aca && mkdir -p .ref && cp -r "$ref" .ref/nanochat-fae3aca
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl torchao==0.18.0
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 \
  packaging==26.4
du -sh .ref .whl
commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || echo "note: the working tree has changes that $commit does not hold"
echo "then, with the device: run(command=\"ONECARD_COMMIT=$commit OUT=\$OUT bash benchmarks/run_on_gpu.sh\", carry=[\".ref\", \".whl\"], timeout_s=540)"
