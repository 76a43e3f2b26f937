#!/usr/bin/env bash
# The GPU figures and tests, in two calls of at most 10 minutes each on a lent GPU machine, which runs the
# checkout from source, no install (run ../shared/tools/gpu-pack first where its image lacks fvcore):
#   bash benchmarks/gpu.sh figures [STEP...]  # all steps, or those named: replays (latency.py as CUDA-graph
#       replays, the layers' forms timed as replays too), kernels (kernels.py's GPU rows at batch 64, the fused
#       kernel among the forms), compile (latency.py under torch.compile: default and reduce-overhead, each with
#       and without freezing), overhead (call_overhead.py), configs (fused_configs.py)
#   bash benchmarks/gpu.sh tests [NODE...]  # tests/test_cuda.py, or the test ids given, run in that order (the
#       fused kernel compiles every block configuration)
# Each step has its own time limit and is stopped with SIGINT, so pytest still prints what failed; result files
# go to $OUT (default: benchmarks/results/gpu-run) as each step ends. With torch 2.11 and a cold Triton cache:
# kernels.py 75 s and fused_configs.py 25 s on an H200, latency.py under compile in four runtimes 100 s on an
# H100; test_cuda.py's 21 tests 414 s on the H200 in two calls (268 s and 146 s), so give the whole file 8 minutes.
# TESTS_LIMIT_S (default 540) bounds the tests step.
set -uo pipefail
cd "$(dirname "$0")"
part=${1:-figures}
steps=(replays kernels compile overhead configs)
wanted() { [[ " ${steps[*]} " == *" $1 "* ]]; }
case $part in
  figures) for name in "${@:2}"; do
             wanted "$name" || { echo "gpu.sh: unknown step '$name'; choose from ${steps[*]}" >&2; exit 2; }
           done
           [ $# -gt 1 ] && steps=("${@:2}") ;;
  tests) [ $# -gt 1 ] || set -- "$part" ../tests/test_cuda.py ;;
  *) echo "gpu.sh: unknown part '$part'; choose figures or tests" >&2; exit 2 ;;
esac
out=${OUT:-results/gpu-run}; mkdir -p "$out"
export PYTHONPATH=$PWD/..:$PWD/../.gpu-deps${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
models=(timm:resnet18 timm:resnet50 timm:vgg16)
stamp=$(mktemp)
step() {
  local limit=$1; shift; echo "== $* (limit ${limit}s)"; timeout -s INT -k 15 "$limit" "$@"; echo "== exit $?"
  find results -maxdepth 1 -name '*gpu*.json' -newer "$stamp" -exec cp {} "$out"/ \;
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch, triton; print(torch.__version__, triton.__version__)"
  case $part in
    figures)
      wanted replays && step 90 $py latency.py --models "${models[@]}" --iters 20 --runtimes cudagraph-bf16-cl
      wanted kernels && DSD_FUSED_KERNEL=1 step 100 $py kernels.py --devices cuda --batch-sizes 64 --models \
        --iters 20 --result-name kernels_gpu
      wanted compile && step 300 $py latency.py --models timm:resnet18 --iters 20 --runtimes compile-bf16-cl \
        compile-graphs-bf16-cl compile-frozen-bf16-cl compile-graphs-frozen-bf16-cl --result-name latency_gpu_compile
      wanted overhead && step 40 $py call_overhead.py --devices cuda --calls 2000 --result-name call_overhead_gpu
      wanted configs && step 60 $py fused_configs.py ;;
    tests)
      step "${TESTS_LIMIT_S:-540}" $py -m pytest -v -p no:cacheprovider --tb=short --durations=5 "${@:2}" ;;
  esac
} 2>&1 | tee "$out/gpu-$part.log"
rm -f "$stamp"
