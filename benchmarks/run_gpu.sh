#!/usr/bin/env bash
# The GPU pass: CUDA tests, then the default benchmark and the layer benchmark, written under OUT.
# Usage: benchmarks/run_gpu.sh OUT      (results go to OUT/<device>/ and OUT/<device>/layers/, the test log to OUT)
set -uo pipefail
out=${1:?usage: benchmarks/run_gpu.sh OUT}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -m pytest tests -q -x -k "cuda or triton or Cuda" 2>&1 | tail -n 40 > "$out/cuda-tests.log"
slug=$(python -c "import torch; from colora_fused.bench import device_slug; print(device_slug(torch.device('cuda')))")
python -m colora_fused.bench --no-progress --out "$out/$slug" 2>&1 | tail -n 60
python -m colora_fused.bench --layers --no-progress --out "$out/$slug/layers" 2>&1 | tail -n 60
cat "$out/cuda-tests.log"
