#!/usr/bin/env bash
# Everything this project checks on a GPU, in one run (at most about 9 minutes on an H100/H200):
#   the CUDA tests, the whole test suite against the torch found there, the runtime benchmark on
#   CUDA, and the zoo sweep with the models on the GPU. Run from the repository root; logs and the
#   results files go to $OUT (default: gpu-results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tee "$OUT/tests_cuda.log"
timeout 120 $PY -m pytest -q -p no:cacheprovider -n 8 tests 2>&1 | tail -40 | tee "$OUT/tests_all.log"
timeout 180 $PY benchmarks/bench_runtime.py --device cuda --reps 50 --warmup 10 2>&1 | tee "$OUT/runtime.log"
cp benchmarks/results/runtime-cuda.md "$OUT/" 2>/dev/null
timeout 60 $PY benchmarks/bench_runtime.py --device cuda --no-compile --reps 30 --warmup 5 \
  --mlp 64 2048 4096 --cnn 7 64 128 --results "$OUT/runtime-cuda-large.md" 2>&1 | tee "$OUT/runtime_large.log"
timeout "${ZOO_SECONDS:-100}" $PY benchmarks/zoo.py --device cuda --preserve-output 2>&1 | tee "$OUT/zoo_cuda.log"
echo done
