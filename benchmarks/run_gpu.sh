#!/usr/bin/env bash
# The full GPU pass, for windows after the first (the first runs benchmarks/gpu_check.sh), in parts that each fit
# one device command of at most 9 minutes and stream what they do:
#   bash benchmarks/run_gpu.sh PART OUT
# PART:
#   tests-kernels  the kernel and CUDA test files (pytest -v, in parallel with pytest-xdist where installed)
#   tests-rest     every other test file (the same way)
#   bench          colora-bench's default run (ResNet-50 and VGG-16, every method) → OUT/<device>/
#   bench-layers   colora-bench --layers → OUT/<device>/layers/
#   bench-mixed    colora-bench --mixed 8 (a batch of 8 adapter sets, issue #26's targets) → OUT/<device>/mixed/
# Each part runs under `timeout` (GPU_PART_S, default 530 s), streams to the terminal and to OUT/PART.log, and
# keeps what it wrote when cut short. The lent GPU machines have torch, torchvision, triton, peft and matplotlib:
# the package runs from this checkout, nothing is installed.
set -uo pipefail
part=${1:?usage: benchmarks/run_gpu.sh tests-kernels|tests-rest|bench|bench-layers|bench-mixed OUT}
out=${2:?usage: benchmarks/run_gpu.sh PART OUT}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
limit=${GPU_PART_S:-530}
kernel_tests=(tests/kernels/test_triton_forward.py tests/kernels/test_triton_backward.py tests/kernels/test_triton_autograd.py
              tests/kernels/test_triton_segmented.py tests/kernels/test_merge_many.py tests/kernels/test_cuda.py)
workers=()
if python -c "import xdist" 2>/dev/null; then workers=(-n "$(nproc)"); fi
slug() { python -c "import torch; from colora_fused.bench.common import device_slug; print(device_slug(torch.device('cuda')))"; }
case $part in
    tests-kernels) cmd=(python -m pytest "${kernel_tests[@]}" -v -p no:cacheprovider "${workers[@]}") ;;
    tests-rest) cmd=(python -m pytest tests -v -p no:cacheprovider "${workers[@]}"
                     $(printf -- '--ignore=%s ' "${kernel_tests[@]}")) ;;
    bench) cmd=(python -m colora_fused.bench --no-progress --out "$out/$(slug)") ;;
    bench-layers) cmd=(python -m colora_fused.bench --layers --no-progress --out "$out/$(slug)/layers") ;;
    bench-mixed) cmd=(python -m colora_fused.bench --mixed 8 --no-progress --out "$out/$(slug)/mixed") ;;
    *) echo "run_gpu.sh: unknown part $part; choose tests-kernels, tests-rest, bench, bench-layers or bench-mixed" >&2
       exit 2 ;;
esac
timeout --kill-after=10 "$limit" "${cmd[@]}" 2>&1 | tee "$out/$part.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "run_gpu.sh: $part cut short after $limit s; $out/$part.log holds what it did" >&2
exit "$rc"
