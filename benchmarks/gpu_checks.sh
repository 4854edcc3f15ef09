#!/usr/bin/env bash
# Issue 7's GPU checks in one call on a lent GPU machine, which has torch, transformers, peft, accelerate and
# pytest but no network: the wheels it lacks are carried in .whl/ (on this machine:
# `pip download --no-deps -d .whl diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7`, and xformers for the
# xformers variants: xformers 0.0.35 is a 3 MB wheel for torch >= 2.10). Runs the GPU tests, bench_gpu.py's
# floors (the cached LoRA step: plain, checkpointed, with xformers) and bench_gpu_trainer.py with the sync list;
# results under $OUT. About 8.5 minutes on an H200. Extra arguments go to bench_gpu_trainer.py (--skip compile
# saves 3 of them).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/test_gpu.txt"
python benchmarks/bench_gpu.py --out "$OUT/floor.json" --skip cudnn-benchmark encode fp32-tf32 fp32 full \
    compile matmul flops sampling 2>&1 | grep -E "^\| (variant|cached|ckpt|xformers) "
python benchmarks/bench_gpu_trainer.py --out "$OUT" --sync-debug "$@" 2>&1 | grep -v -i warn | tail -12
