"""Each `train.optimizer` on the same bare training step: step time and the memory of its state.

The step is bench_step.Floor's (UNet forward, loss, backward, the optimizer's step; nothing else) for the default
from-scratch model of configs/shapes.yaml, trained in full (1.7M weights, batch 32, 32 px, fp32) so that the
optimizer's state is a visible share of memory. Reported per optimizer: the median step time after warm-up and the
bytes of its state tensors (moments, factored statistics, Prodigy's and schedule-free's extra copies) against the
weights'. adamw_8bit needs a CUDA GPU and is skipped on a CPU.

    python benchmarks/bench_optimizers.py [--steps 20] [--json benchmarks/results/optimizers.json]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_step import Floor  # noqa: E402
from finetune.config import load_config  # noqa: E402

SETTINGS = {
    "adamw": [],
    "sgd": ["train.optimizer_args={momentum: 0.9}"],
    "adafactor": [],
    "prodigy": ["train.learning_rate=1.0"],
    "adamw_schedulefree": ["train.lr_scheduler=constant", "train.use_ema=false"],
}


def state_bytes(optimizer) -> int:
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    rows = {}
    for name, overrides in SETTINGS.items():
        config = load_config(ROOT / "configs" / "shapes.yaml", [f"train.optimizer={name}", *overrides])
        floor = Floor(config)
        times = floor.times(args.steps)
        weights = sum(p.numel() * p.element_size() for p in floor.params)
        rows[name] = {"step_s": round(statistics.median(times), 4), "state_MiB": round(state_bytes(floor.optimizer)
                                                                                        / 2**20, 2),
                      "state_per_weight_byte": round(state_bytes(floor.optimizer) / weights, 2)}
        print(name, rows[name], flush=True)
    result = {"job": "configs/shapes.yaml's model in full, batch 32, 32 px, fp32, bare step (bench_step.Floor)",
              "threads": torch.get_num_threads(), "steps_timed": args.steps, "optimizers": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
