#!/usr/bin/env bash
# Everything this project checks on a GPU, in one run (about 10 minutes on an H200):
#   the CUDA tests, the whole test suite against the torch found there, the runtime benchmark on
#   CUDA (the default sizes with torch.compile, then larger ones in eager mode), and the zoo sweep
#   with the models on the GPU. Run from the repository root; logs and result files go to $OUT
#   (default: gpu-results/), and the runtime results to benchmarks/results/runtime-cuda*.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tee "$OUT/tests_cuda.log"
# one process (pytest-xdist is not among the test extras); about 2 minutes
timeout 300 $PY -m pytest -q -p no:cacheprovider tests 2>&1 | tail -30 | tee "$OUT/tests_all.log"
timeout 200 $PY -m benchmarks.bench_runtime --device cuda --reps 50 --warmup 10 2>&1 | tee "$OUT/runtime.log"
timeout 80 $PY -m benchmarks.bench_runtime --device cuda --no-compile --reps 30 --warmup 5 \
  --mlp 64 2048 4096 --cnn 7 64 128 --results benchmarks/results/runtime-cuda-large.md 2>&1 | tee "$OUT/runtime_large.log"
cp benchmarks/results/runtime-cuda.md benchmarks/results/runtime-cuda-large.md "$OUT/" 2>/dev/null
timeout "${ZOO_SECONDS:-300}" $PY -m benchmarks.zoo --device cuda --preserve-output 2>&1 | tee "$OUT/zoo_cuda.log"
echo done
