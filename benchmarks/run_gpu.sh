#!/usr/bin/env bash
# The GPU pass: the whole test suite on the GPU, then the default benchmark and the layer benchmark.
# Usage: benchmarks/run_gpu.sh OUT   (test log in OUT/tests.log; results in OUT/<device>/ and OUT/<device>/layers/)
# On a machine that already has torch, torchvision, triton, peft and matplotlib (the lent GPU machines do), it
# needs no install: the package runs from this checkout.
set -uo pipefail
out=${1:?usage: benchmarks/run_gpu.sh OUT}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -m pytest tests -q -p no:cacheprovider > "$out/tests.log" 2>&1
tail -n 30 "$out/tests.log"
slug=$(python -c "import torch; from colora_fused.bench import device_slug; print(device_slug(torch.device('cuda')))")
python -m colora_fused.bench --no-progress --out "$out/$slug" 2>&1 | tail -n 40
python -m colora_fused.bench --layers --no-progress --out "$out/$slug/layers" 2>&1 | tail -n 40
