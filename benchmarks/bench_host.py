"""The host's share of a training step, measured on a CPU: bench_all.py's SD-shaped LoRA job with SD 1.x's
structure kept (4 levels, 2 layers per block, 16 transformer blocks, 8 heads) but the UNet's widths cut to
8-16-16-16 channels, so the arithmetic is next to nothing and a step is Python and operator dispatch. That is the
regime of a GPU that outruns its host: on an H200 the SD-1.5 LoRA step is host-bound (benchmarks/README.md).

The trainer's step (finetune/train.py in a subprocess, logged `step_time`) over the bare floor (bench_step.Floor,
timed before and after it, the lower median kept) is then the host work the trainer adds to the UNet's own:
a stand-in for the GPU ratio that needs no GPU, without the GPU's copies and waits. The data loader runs in the
training process (`data.num_workers` 0, as on a CPU), where bench_gpu_trainer.py gives it a worker. No target;
for finding and checking host-side costs between GPU sessions. It runs on the CPU, also where there is a GPU.

    python benchmarks/bench_host.py [--steps 150] [--floor-steps 60] [--threads N] [--workers N] [--logging-steps N]
                                    [--samples N] [section.key=value ...]
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_all import LORA_BATCH, LORA_SAMPLES, LORA_WARMUP, SD_UNET, build_tiny_sd, lora_overrides, run_trainer  # noqa: E402
from bench_step import Floor, trainer_args  # noqa: E402

from finetune.config import load_config  # noqa: E402

RESOLUTION = 64  # 8x8 latents
HOST_UNET = {**SD_UNET, "block_out_channels": (8, 16, 16, 16), "norm_num_groups": 8, "sample_size": RESOLUTION // 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="timed trainer steps (after the cache fills)")
    parser.add_argument("--floor-steps", type=int, default=60, help="timed floor steps, before and after")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workers", type=int, default=0,
                        help="data.num_workers (1: the loader in its own process, as bench_gpu_trainer.py runs it)")
    parser.add_argument("--logging-steps", type=int, default=1,
                        help="train.logging_steps; the step time is then each window's mean (the recipes log every "
                             "10 or 20 steps)")
    parser.add_argument("--samples", type=int, default=LORA_SAMPLES,
                        help="data.num_samples: the epoch is samples / 8 steps; the first fills the cache and is not "
                             "timed")
    parser.add_argument("overrides", nargs="*", help="more section.key=value overrides, for the trainer and the "
                                                     "floor alike (train.compile=true: both compiled)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-host-") as work:
        folder = build_tiny_sd(Path(work) / "base", unet=HOST_UNET)
        overrides = [*lora_overrides(folder, "no", args.threads), f"data.resolution={RESOLUTION}",
                     f"data.num_workers={args.workers}", f"data.num_samples={args.samples}", *args.overrides]
        warmup = max(LORA_WARMUP, args.samples // LORA_BATCH + 2)  # (the first epoch encodes what it caches)
        floor = Floor(load_config(None, overrides))
        before = statistics.median(floor.times(args.floor_steps))
        out = Path(work) / "trainer"
        argv = [*trainer_args(None, overrides, args.steps + warmup, str(out)),
                f"train.logging_steps={args.logging_steps}"]
        trainer = run_trainer(argv, out, -(-warmup // args.logging_steps),  # (the windows the warm-up touches)
                              env={"CUDA_VISIBLE_DEVICES": ""})  # the floor runs on the CPU too
        after = statistics.median(floor.times(args.floor_steps))
    step, floor_s = statistics.median(trainer["times"]), min(before, after)
    extra = "".join(f", {override}" for override in args.overrides)
    print("\n| job | trainer step | floor step | trainer - floor | ratio |\n|---|---|---|---|---|")
    print(f"| SD-1.x-structured LoRA, UNet 8-16-16-16 wide, batch {LORA_BATCH}, {RESOLUTION} px, fp32, data.cache, "
          f"{args.threads} threads, {args.workers} workers, logging every {args.logging_steps}, "
          f"{args.samples} samples{extra} "
          f"| {step * 1000:.1f} ms | {floor_s * 1000:.1f} ms (before {before * 1000:.1f}, "
          f"after {after * 1000:.1f}) | {(step - floor_s) * 1000:.1f} ms | {step / floor_s:.3f} |")


if __name__ == "__main__":
    main()
