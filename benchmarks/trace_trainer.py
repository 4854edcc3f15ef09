"""Run finetune/train.py under torch.profiler and write where a training step's time goes: the wall time of
each profiled step, the GPU kernel time in it (how busy the GPU is), and the operators that take the most host
and device time. The profiler follows the optimizer steps (a global step hook), so it needs no change to the
trainer.

    python benchmarks/trace_trainer.py REPORT.txt --wait 20 --active 8 -- finetune/train.py --config ... [overrides]
"""

import argparse
import runpy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report")
    parser.add_argument("--wait", type=int, default=20, help="optimizer steps before profiling")
    parser.add_argument("--active", type=int, default=8, help="optimizer steps profiled")
    if "--" not in sys.argv:
        parser.error("give the training script and its arguments after --")
    split = sys.argv.index("--")
    args, script = parser.parse_args(sys.argv[1:split]), sys.argv[split + 1:]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities, schedule=schedule(wait=args.wait, warmup=2, active=args.active, repeat=1))
    ends = []

    def step_hook(optimizer, *_) -> None:
        ends.append(time.perf_counter())
        profiler.step()

    register_optimizer_step_post_hook(step_hook)
    profiler.start()
    sys.argv = script
    try:
        runpy.run_path(script[0], run_name="__main__")
    finally:
        profiler.stop()
    first = args.wait + 2
    walls = [b - a for a, b in zip(ends[first - 1:first + args.active - 1], ends[first:first + args.active])]
    averages = profiler.key_averages()
    # Kernel time: the events on the device itself (an operator's device time repeats its kernels'), as the table's
    # "Self CUDA time total" counts it.
    device_us = sum(e.self_device_time_total for e in averages
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    lines = [f"profiled steps {first + 1}..{first + args.active}: wall per step median "
             f"{1000 * statistics.median(walls):.1f} ms ({', '.join(f'{1000 * w:.0f}' for w in walls)})",
             f"device (kernel) time per step: {device_us / 1000 / args.active:.1f} ms", ""]
    for key in ("self_device_time_total", "self_cpu_time_total"):
        if key == "self_device_time_total" and not device_us:
            continue
        lines += [f"by {key}:", averages.table(sort_by=key, row_limit=30), ""]
    Path(args.report).write_text("\n".join(lines))
    print("\n".join(lines[:2]))


if __name__ == "__main__":
    main()
