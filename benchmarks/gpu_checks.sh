#!/usr/bin/env bash
# Issue 7's GPU checks in one call on a lent GPU machine, which has torch, transformers, peft, accelerate and
# pytest but no network: the wheels it lacks are carried in .whl/ (on this machine:
# `pip download --no-deps -d .whl diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7`). Runs the GPU tests,
# bench_gpu.py's floors (the cached LoRA step, plain and checkpointed) and bench_gpu_trainer.py with the sync list;
# results under $OUT. Extra arguments go to bench_gpu_trainer.py (e.g. --skip compile).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/test_gpu.txt"
python benchmarks/bench_gpu.py --out "$OUT/floor.json" --skip cudnn-benchmark xformers encode fp32-tf32 fp32 full \
    compile matmul flops sampling 2>&1 | grep -E "^\| (variant|cached|ckpt) "
python benchmarks/bench_gpu_trainer.py --out "$OUT" --sync-debug "$@" 2>&1 | grep -v -i warn | tail -12
