#!/bin/bash
# Reproduce the issue-21 measurements (benchmarks/conditioning/README.md). One training run at a time; outputs
# under $OUT (default /tmp/cond). Each run: about 10 minutes on two idle CPU cores.
#   bash benchmarks/conditioning/run.sh                 # data, baseline, fix, control, then the measurements
#   bash benchmarks/conditioning/run.sh x0uni           # only the named runs (base x0uni x0snr5 shapes-x0uni)
set -e
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/cond}
export OMP_WAIT_POLICY=PASSIVE   # 2 threads on 2 busy cores otherwise spin: measured 7-14 s/step instead of 0.4
mkdir -p "$OUT/runs" "$OUT/results"
[ -f "$OUT/digits/split.json" ] || python benchmarks/conditioning/make_digits.py "$OUT/digits"
DIGITS=(data.source=webdataset "data.path=$OUT/digits/{00000..00001}.tar" data.resampled=true data.num_samples=1438
        train.cpu_threads=2 train.checkpoints_total_limit=null validation.validation_steps=0
        "validation.prompts=[a handwritten digit zero, a handwritten digit seven]" validation.num_images_per_prompt=2
        validation.process_strips=false)
train() { name=$1; shift
  accelerate launch -q --config_file accelerate_config.yaml finetune/train.py --config configs/shapes.yaml \
    train.output_dir="$OUT/runs/$name" "$@"; }
measure() { run=$1; shift   # checkpoints' strength, then adherence of the final pipeline (n=10, guidance 1 and 3)
  python benchmarks/conditioning/strength.py "$OUT"/runs/$run/checkpoint-500 "$OUT"/runs/$run/checkpoint-1000 \
    "$OUT/runs/$run" --out "$OUT/results/$run.str.json"
  python benchmarks/conditioning/classify.py "$OUT"/runs/$run/checkpoint-500 "$OUT/runs/$run" --n 10 \
    --out "$OUT/results/$run.adh.json"; }
runs=${*:-base x0uni x0snr5 shapes-x0uni}
for run in $runs; do
  case $run in
    base)   train base "${DIGITS[@]}"; measure base ;;
    x0uni)  train x0uni "${DIGITS[@]}" model.prediction_type=sample train.snr_gamma=null; measure x0uni ;;
    x0snr5) train x0snr5 "${DIGITS[@]}" model.prediction_type=sample train.snr_gamma=5.0; measure x0snr5 ;;
    shapes-x0uni) train shapes-x0uni model.prediction_type=sample train.snr_gamma=null train.cpu_threads=2 \
                    validation.validation_steps=0
            python -m finetune.evaluate "$OUT/runs/shapes-x0uni"
            python benchmarks/conditioning/strength.py "$OUT/runs/shapes-x0uni" --data shapes \
              --out "$OUT/results/shapes-x0uni.str.json" ;;
  esac
done
