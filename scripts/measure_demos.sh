#!/usr/bin/env bash
# Measure the README's headline numbers and record them in docs/results/demos.json: the default run (the commands
# of scripts/demo.sh) and the LoRA demonstration (configs/shapes-lora.yaml on that run), each timed and evaluated,
# the LoRA's base evaluated on the same six colours and seeds. The README quotes that file, and
# tests/test_readme_claims.py checks that it does. About 25 minutes on two CPU cores; give the machine to it alone,
# or the times say more about the other work than about the trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-outputs/measure}"
SIX=(red orange yellow green blue purple)
now() { "$PYTHON" -c 'import time; print(time.time())'; }

t0=$(now)
accelerate launch -q --config_file accelerate_config.yaml finetune/train.py --config configs/shapes.yaml \
    "train.output_dir=$OUT/shapes"
t1=$(now)
"$PYTHON" -m finetune.evaluate "$OUT/shapes" --json "$OUT/shapes-report.json"
t2=$(now)
accelerate launch -q --config_file accelerate_config.yaml finetune/train.py --config configs/shapes-lora.yaml \
    "model.pretrained_model_name_or_path=$OUT/shapes" "train.output_dir=$OUT/shapes-lora"
t3=$(now)
"$PYTHON" -m finetune.evaluate "$OUT/shapes-lora" --colors "${SIX[@]}" --json "$OUT/lora-report.json"
t4=$(now)
"$PYTHON" -m finetune.evaluate "$OUT/shapes" --colors "${SIX[@]}" --no-save --json "$OUT/base-six-report.json"

"$PYTHON" scripts/record_demos.py --out docs/results/demos.json \
    --default "$OUT/shapes" "$OUT/shapes-report.json" "$t0" "$t1" "$t2" \
    --lora "$OUT/shapes-lora" "$OUT/lora-report.json" "$t2" "$t3" "$t4" \
    --lora-base "$OUT/base-six-report.json"
