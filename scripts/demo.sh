#!/usr/bin/env bash
# The main job, from a fresh checkout: install, write the built-in dataset, train the default model
# (about 14 minutes on two CPU cores, docs/results/demos.json), sample and score it, and say where everything went.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# torch first, pinned: on these machines pip finds the CPU wheel of 2.13.0 locally; an unpinned torch pulls a
# CUDA build of several GB (on other machines, choose your build from pytorch.org
# first; any torch >= 2.6 works, as pyproject.toml says).
"$PYTHON" -m pip install --quiet torch==2.13.0
"$PYTHON" -m pip install --quiet -e .

accelerate launch -q --config_file accelerate_config.yaml finetune/train.py --config configs/shapes.yaml "$@"
OUT="$("$PYTHON" -c 'import sys; from finetune.config import load_config; print(load_config("configs/shapes.yaml", sys.argv[1:]).train.output_dir)' "$@")"
"$PYTHON" -m finetune.evaluate "$OUT"   # writes $OUT/evaluation.json
echo "evaluation: $OUT/evaluation.json"
