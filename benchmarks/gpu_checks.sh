#!/usr/bin/env bash
# Issue 7's GPU checks on a lent GPU machine, in two parts that each fit one call (at most 10 minutes), the first
# the one that matters most. The machine has torch, transformers, peft, accelerate and pytest but no network: the
# wheels it lacks are carried in .whl/ (on this machine: `pip download --no-deps -d .whl diffusers==0.42.1
# webdataset==1.0.2 braceexpand==0.1.7 bitsandbytes==0.50.2`, and xformers 0.0.35, a 3 MB wheel for torch >= 2.10;
# 51 MB in all, under the 64 MiB a call carries).
#
#   OUT=... bash benchmarks/gpu_checks.sh 1   # about 7 minutes on an H200
#     the GPU tests; bench_gpu.py's floors (the cached LoRA step: plain, without peft's input casts as the
#     trainer runs it, checkpointed, with xformers; full fine-tuning with AdamW and with 8-bit AdamW);
#     bench_gpu_trainer.py plain, with xformers, checkpointed and logging every 20 steps, and the sync list
#   OUT=... bash benchmarks/gpu_checks.sh 2   # about 6 minutes: torch.compile, the floor and the trainer
#
# Results under $OUT/part1 or $OUT/part2. Extra arguments go to bench_gpu_trainer.py (its --skip is the part's).
set -uo pipefail
PART=${1:?give the part: 1 or 2}
shift
if [ "$PART" != 1 ] && [ "$PART" != 2 ]; then
    echo "unknown part $PART: give 1 or 2" >&2
    exit 2
fi
OUT=${OUT:-gpu-results}/part$PART
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
SKIP_FLOORS=(cudnn-benchmark encode fp32-tf32 fp32 matmul flops sampling)
if [ "$PART" = 1 ]; then
    python -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/test_gpu.txt"
    python benchmarks/bench_gpu.py --out "$OUT/floor.json" --skip "${SKIP_FLOORS[@]}" compile 2>&1 \
        | grep -E "^\| (variant|cached|no-input-cast|ckpt|xformers|full|full-8bit) "
    python benchmarks/bench_gpu_trainer.py --out "$OUT" "$@" --skip compile --sync-debug 2>&1 | grep -v -i warn \
        | tail -12
else
    python benchmarks/bench_gpu.py --out "$OUT/floor-compile.json" --skip "${SKIP_FLOORS[@]}" ckpt xformers full \
        full-8bit no-input-cast 2>&1 | grep -E "^\| (variant|cached|compile) "
    python benchmarks/bench_gpu_trainer.py --out "$OUT" "$@" --skip plain ckpt xformers log20 2>&1 \
        | grep -v -i warn | tail -12
fi
