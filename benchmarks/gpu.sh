#!/usr/bin/env bash
# The GPU figures in one call (a lent GPU machine runs the checkout from source, no install; run
# ../shared/tools/gpu-pack first where its image lacks fvcore): benchmarks/latency.py as CUDA-graph replays and
# with the fused kernel among the timed forms, in eager PyTorch; the fused kernel's block configurations
# (fused_configs.py), benchmarks/kernels.py's GPU rows (the fused kernel among the timed forms), then the tests
# that need a GPU (tests/test_cuda.py: the fused kernel compiles each block configuration, minutes on a cold
# Triton cache). Each step has its own time limit, so one that overruns leaves the others' results. Logs and
# result files go to $OUT (default: benchmarks/results/gpu-run). On an H100 the first three steps took about
# 35 s, 35 s and 100 s (the third on a cold Triton cache); fused_configs.py about 40 s.
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-results/gpu-run}; mkdir -p "$out"
export PYTHONPATH=$PWD/..:$PWD/../.gpu-deps${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
models=(timm:resnet18 timm:resnet50 timm:vgg16)
step() { local limit=$1; shift; echo "== $* (limit ${limit}s)"; timeout "$limit" "$@"; echo "== exit $?"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch, triton; print(torch.__version__, triton.__version__)"
  step 100 $py latency.py --models "${models[@]}" --iters 20 --runtimes cudagraph-bf16-cl
  DSD_FUSED_KERNEL=1 step 120 $py latency.py --models "${models[@]}" --iters 20 --runtimes cudagraph-bf16-cl \
    --result-name latency_gpu_fused
  step 100 $py latency.py --models "${models[@]}" --iters 20 --runtimes eager-bf16-cl eager \
    --result-name latency_gpu_eager
  step 90 $py fused_configs.py
  DSD_FUSED_KERNEL=1 step 200 $py kernels.py --devices cuda --models --iters 20 --result-name kernels_gpu
  step 200 $py -m pytest -q -p no:cacheprovider ../tests/test_cuda.py
} 2>&1 | tee "$out/gpu.log"
cp results/latency_gpu.json results/latency_gpu_fused.json results/fused_configs_gpu.json results/latency_gpu_eager.json results/kernels_gpu.json "$out"/ 2>/dev/null
true
