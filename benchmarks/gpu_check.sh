#!/usr/bin/env bash
# The staged GPU check (about 8 minutes on an H100): bash benchmarks/gpu_check.sh [--dry-run] OUT
#
# Phases, one after another, each in its own process under its own timeout (seconds, overridable as
# GPU_CHECK_<PHASE>_S); each writes as it goes, and OUT/timeline.csv gets a row per phase (seconds, ok / failed
# (exit code) / timeout, Triton cache entries), so an overrun costs that phase only:
#   env 20, warmup 100 (compiles the kernels in parallel into Triton's cache), tests 90 (the kernel tests on
#   CUDA at their fixed configs, pytest -v streamed to tests.log), kernels 80 (every family at the autotuner's
#   configs against float64), layers 60 (layer timings), model 100 (model throughput), then the summary:
#   450 s of limits (and 5 s of grace each) in all, so the check ends within 8 minutes whatever a phase does.
# --dry-run runs every phase on CPU with tiny shapes, under 4 times the limits: the warm-up records its launches
# without compiling, the kernels run in Triton's interpreter, the timings take the torch backends (CI does, so that
# the script itself is never what breaks on the GPU). Results: OUT/summary.md, env.json, timeline.csv, tests.log, kernels.csv,
# layers/, model/, check.log. On the lent GPU machines commit them under benchmarks/results/<device>/.
set -uo pipefail
dry=""
if [ "${1:-}" = "--dry-run" ]; then dry="--dry-run"; shift; fi
out=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUT}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
unset COLORA_TRITON_AUTOTUNE
exec > >(tee -a "$out/check.log") 2>&1

echo "phase,started,seconds,status,triton_cache" > "$out/timeline.csv"
cache_entries() { find "$TRITON_CACHE_DIR" -name '*.json' ! -name '__grp__*' 2>/dev/null | wc -l; }

phase() {  # phase NAME DEFAULT_SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local var="GPU_CHECK_${name^^}_S"
    if [ -n "$dry" ]; then limit=$((limit * 4)); fi  # CPU and the interpreter, on a CI machine that may be busy
    limit=${!var:-$limit}
    local start=$SECONDS started
    started=$(date -u +%H:%M:%S)
    echo "=== phase $name (limit ${limit} s) at $started"
    timeout --kill-after=5 "$limit" "$@"
    local rc=$? status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status="failed ($rc)"; fi
    echo "$name,$started,$((SECONDS - start)),$status,$(cache_entries)" >> "$out/timeline.csv"
    echo "=== phase $name: $status after $((SECONDS - start)) s"
}

check=(python benchmarks/gpu_check.py)

if [ -n "$dry" ]; then
    tests=(tests/kernels/test_triton_forward.py -k "2d-k3-pad1-pointwise_first")
    model=(--device cpu --model resnet18 --batch 2 --image-size 32 --warmup 0 --rounds 1
           --methods full,colora-torch,colora-torch-kxk)
else
    tests=(tests/kernels/test_triton_forward.py tests/kernels/test_triton_backward.py tests/kernels/test_triton_autograd.py
           tests/kernels/test_merge_many.py tests/kernels/test_cuda.py)
    model=(--model resnet50,vgg16 --warmup 2 --rounds 6 --steps-per-round 1
           --methods full,colora-torch,colora-hybrid,colora-triton,colora-torch-kxk,colora-hybrid-kxk,colora-triton-kxk)
fi
workers=()
if python -c "import xdist" 2>/dev/null; then workers=(-n "$(nproc)"); fi

phase env 20 "${check[@]}" env "$out" $dry
phase warmup 100 "${check[@]}" warmup "$out" $dry
phase tests 90 bash -c 'log=$1; shift; exec python -m pytest "$@" > "$log" 2>&1' _ "$out/tests.log" \
    "${tests[@]}" -v -p no:cacheprovider "${workers[@]}" --junitxml="$out/tests.xml"
tail -n 5 "$out/tests.log"
phase kernels 80 env ${dry:+TRITON_INTERPRET=1} "${check[@]}" kernels "$out" $dry
phase layers 60 "${check[@]}" layers "$out" $dry
phase model 100 python -m colora_fused.bench "${model[@]}" --no-progress --out "$out/model"
"${check[@]}" report "$out"
