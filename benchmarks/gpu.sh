#!/usr/bin/env bash
# The GPU figures in one call (a lent GPU machine runs the checkout from source, no install; run
# ../shared/tools/gpu-pack first where its image lacks fvcore): the fused kernel's exactness on the device,
# then benchmarks/kernels.py's GPU rows and benchmarks/latency.py on a GPU with the fused kernel among the
# timed forms and without it. Each step has its own time limit, so one that overruns leaves the others'
# results. Logs and result files go to $OUT (default: benchmarks/results/gpu-run).
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-results/gpu-run}; mkdir -p "$out"
export PYTHONPATH=$PWD/..:$PWD/../.gpu-deps${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() { local limit=$1; shift; echo "== $* (limit ${limit}s)"; timeout "$limit" "$@"; echo "== exit $?"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch, triton, onnxruntime as o; print(torch.__version__, triton.__version__, o.__version__, o.get_available_providers())"
  step 120 $py -m pytest -q -p no:cacheprovider -x ../tests/test_kernels_cuda.py ../tests/test_forms.py
  DSD_FUSED_KERNEL=1 step 150 $py kernels.py --devices cuda --models --iters 20 --result-name kernels_gpu
  DSD_FUSED_KERNEL=1 step 180 $py latency.py --models timm:resnet18 timm:resnet50 timm:vgg16 --iters 20 \
    --runtimes cudagraph-bf16-cl eager-bf16-cl eager
  DSD_FUSED_KERNEL=0 step 70 $py latency.py --models timm:resnet18 timm:resnet50 timm:vgg16 --iters 20 \
    --runtimes cudagraph-bf16-cl --result-name latency_gpu_unfused
} 2>&1 | tee "$out/gpu.log"
cp results/kernels_gpu.json results/latency_gpu.json results/latency_gpu_unfused.json "$out"/ 2>/dev/null
true
