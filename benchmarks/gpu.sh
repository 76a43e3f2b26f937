#!/usr/bin/env bash
# The GPU figures in one call of at most 10 minutes (a lent GPU machine runs the checkout from source, no
# install; run ../shared/tools/gpu-pack first where its image lacks fvcore), most wanted first:
# benchmarks/latency.py as CUDA-graph replays, the fused kernel's block configurations (fused_configs.py),
# benchmarks/kernels.py's GPU rows (the fused kernel among the timed forms), the tests that need a GPU
# (tests/test_cuda.py: the fused kernel compiles its block configurations, minutes on a cold Triton cache),
# latency.py in eager PyTorch, a separable layer's host time per eager call (call_overhead.py), and as
# CUDA-graph replays with the fused kernel among the forms. Each step has its
# own time limit, so one that overruns leaves the others' results. Logs and result files go to $OUT (default:
# benchmarks/results/gpu-run). On an H100: latency.py about 35 s a runtime, fused_configs.py 40 s, kernels.py
# 100 s and test_cuda.py over 120 s on a cold Triton cache.
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
  step 80 $py latency.py --models "${models[@]}" --iters 20 --runtimes cudagraph-bf16-cl
  step 60 $py fused_configs.py
  DSD_FUSED_KERNEL=1 step 160 $py kernels.py --devices cuda --models --iters 20 --result-name kernels_gpu
  step 150 $py -m pytest -q -p no:cacheprovider ../tests/test_cuda.py
  step 60 $py latency.py --models "${models[@]}" --iters 20 --runtimes eager-bf16-cl eager \
    --result-name latency_gpu_eager
  step 20 $py call_overhead.py --devices cuda --calls 2000 --result-name call_overhead_gpu
  DSD_FUSED_KERNEL=1 step 60 $py latency.py --models "${models[@]}" --iters 20 --runtimes cudagraph-bf16-cl \
    --result-name latency_gpu_fused
} 2>&1 | tee "$out/gpu.log"
cp results/latency_gpu.json results/latency_gpu_fused.json results/fused_configs_gpu.json \
  results/latency_gpu_eager.json results/kernels_gpu.json results/call_overhead_gpu.json "$out"/ 2>/dev/null
true
