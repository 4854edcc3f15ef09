"""Training step of a config next to the bare floor for the same batch, measured in one run.

The trainer's step is what `finetune/train.py` logs as `step_time` (data, text encoder, noise, UNet,
backward, clipping, optimizer, LR schedule, EMA). The floor is the UNet forward + backward + AdamW step
alone, on fixed tensors, at the same batch size and precision. The floor is measured before and after the
trainer; the lower of the two medians is used, so a noisy neighbour can only make the ratio look worse.

    python benchmarks/bench_step.py [--config configs/shapes.yaml] [--steps 60] [section.key=value ...]
"""

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune import train as trainer  # noqa: E402
from finetune.config import load_config  # noqa: E402
from finetune.data import shapes  # noqa: E402
from finetune.models import build_components  # noqa: E402
from finetune.objective import diffusion_loss  # noqa: E402

WARMUP = 5


def floor_step_times(config, steps: int) -> list[float]:
    """UNet forward + backward + AdamW step on one fixed batch, nothing else."""
    torch.manual_seed(0)
    components = build_components(config.model, config.data.resolution, shapes.all_captions())
    unet = components.unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.train.learning_rate)
    batch, res = config.train.train_batch_size, config.data.resolution
    pixels, noise = torch.randn(batch, 3, res, res), torch.randn(batch, 3, res, res)
    timesteps = torch.randint(0, 1000, (batch,))
    with torch.no_grad():
        ids = components.tokenizer(["a red circle"] * batch, padding="max_length", return_tensors="pt").input_ids
        text = components.text_encoder(ids)[0]
    precision = config.train.mixed_precision
    times = []
    for _ in range(steps + WARMUP):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = unet(pixels, timesteps, encoder_hidden_states=text).sample
        diffusion_loss(pred, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def trainer_step_times(config_path: str | None, overrides: list[str], steps: int, out: str) -> list[float]:
    trainer.main([*(["--config", config_path] if config_path else []), *overrides,
                  f"train.max_train_steps={steps + WARMUP}", "train.logging_steps=1", "train.checkpointing_steps=0",
                  "validation.validation_steps=0", "validation.num_inference_steps=2", f"train.output_dir={out}"])
    events = EventAccumulator(str(next(Path(out, "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return [e.value for e in events.Scalars("step_time")][WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    torch.set_num_threads(config.train.cpu_threads or len(__import__("os").sched_getaffinity(0)))

    floor_before = statistics.median(floor_step_times(config, args.steps // 2))
    with tempfile.TemporaryDirectory() as out:
        trainer_times = trainer_step_times(args.config, args.overrides, args.steps, out)
    floor_after = statistics.median(floor_step_times(config, args.steps // 2))
    step, floor = statistics.median(trainer_times), min(floor_before, floor_after)
    batch = config.train.train_batch_size * config.train.gradient_accumulation_steps
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("\n| config | batch | precision | threads | trainer step | floor step | ratio | samples/s | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {Path(args.config).name} | {batch} | {config.train.mixed_precision} | {torch.get_num_threads()} | "
          f"{step * 1000:.0f} ms | {floor * 1000:.0f} ms (before {floor_before * 1000:.0f}, after "
          f"{floor_after * 1000:.0f}) | {step / floor:.3f} | {batch / step:.1f} | {peak_mib:.0f} MiB |")


if __name__ == "__main__":
    main()
