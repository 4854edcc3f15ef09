"""Training step of a config next to the bare floor for the same batch, measured in one run.

The trainer's step is what `finetune/train.py` logs as `step_time` (data, text encoder, noise, UNet,
backward, clipping, optimizer, LR schedule, EMA). The floor is the UNet forward + backward + AdamW step
alone, on fixed tensors, at the same batch size and precision, over the same trainable parameters (the
adapters alone for a LoRA run). The floor is measured before and after the trainer; the lower of the two
medians is used, so a noisy neighbour can only make the ratio look worse.

    python benchmarks/bench_step.py [--config configs/shapes.yaml] [--steps 60] [section.key=value ...]

`benchmarks/bench_all.py` reuses these pieces (`Floor`, `trainer_args`, `read_step_times`) for its suite.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune import lora  # noqa: E402
from finetune import train as trainer  # noqa: E402
from finetune.config import Config, load_config  # noqa: E402
from finetune.data import shapes  # noqa: E402
from finetune.models import build_components, load_components  # noqa: E402
from finetune.objective import diffusion_loss  # noqa: E402
from finetune.performance import configure_backends, make_optimizer, resolve_precision, speed_up  # noqa: E402

WARMUP = 5
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of `step`, after `warmup` untimed ones, the device synchronised around
    each."""
    times = []
    for _ in range(steps + warmup):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times[warmup:]


class Floor:
    """The bare training step of a config: UNet forward, the loss, backward and an AdamW step over the UNet's
    trainable parameters (all of them, or the adapters of a LoRA run, attached as the trainer attaches them), on
    one fixed batch of x_0-shaped input, timesteps and text embeddings, at the trainer's batch size and
    precision (`train.mixed_precision`, `auto` resolved as the trainer does). Nothing else: no data, no encoders, no
    noise sampling, no clipping, no LR schedule, no EMA."""

    def __init__(self, config: Config, device: str | torch.device = "cpu"):
        torch.manual_seed(0)
        self.device, self.precision = torch.device(device), resolve_precision(config.train.mixed_precision)
        if config.model.pretrained_model_name_or_path:
            components = load_components(config.model)
        else:
            components = build_components(config.model, config.data.resolution, shapes.all_captions())
        self.dtype = dtype = DTYPES.get(self.precision, torch.float32)
        if config.lora.enabled:  # as the trainer's build_model: frozen base in the training precision, fp32 adapters
            lora.attach(components, config.lora, autocast=self.precision in DTYPES)
            components.unet.to(self.device, dtype)
            cast_training_params(components.unet, dtype=torch.float32)
        self.unet = components.unet.to(self.device).train()
        # The trainer's levers (TF32, gradient checkpointing, xformers, compile; its optimizer) apply here too.
        configure_backends(config.train, self.device)
        speed_up(self.unet, [], config.train, self.device)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config.train, self.device)

        # The fixed batch: x_0-shaped noise (pixels, or latents at the VAE's scale), timesteps, text embeddings.
        batch, size, channels = config.train.train_batch_size, config.data.resolution, self.unet.config.in_channels
        if components.vae is not None:
            size //= 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.samples = torch.randn(batch, channels, size, size, device=self.device)
        self.noise = torch.randn_like(self.samples)
        self.timesteps = torch.randint(0, 1000, (batch,), device=self.device)
        text_encoder = components.text_encoder.to(self.device, dtype).eval()
        ids = components.tokenizer(["a red circle"] * batch, padding="max_length", truncation=True,
                                   return_tensors="pt").input_ids
        with torch.no_grad():
            self.text = text_encoder(ids.to(self.device))[0]

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.precision in DTYPES):
            pred = self.unet(self.samples, self.timesteps, encoder_hidden_states=self.text).sample
        diffusion_loss(pred, self.noise).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def times(self, steps: int, warmup: int = WARMUP) -> list[float]:
        """Seconds of each of `steps` steps, after `warmup` untimed ones."""
        return timed(self.step, self.device, steps, warmup)

    def flops(self) -> int:
        """Floating-point operations of one step's forward and backward (matmuls, convolutions, attention), as
        `torch.utils.flop_counter` counts them; the optimizer's elementwise work is not counted."""
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.precision in DTYPES):
                pred = self.unet(self.samples, self.timesteps, encoder_hidden_states=self.text).sample
            diffusion_loss(pred, self.noise).backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def trainer_args(config_path: str | None, overrides: list[str], steps: int, out: str) -> list[str]:
    """The trainer's arguments for a timed run of `steps` optimizer steps: step times logged every step,
    no checkpoints, no validation during the run and a 2-step one at the end."""
    return [*(["--config", config_path] if config_path else []), *overrides, f"train.max_train_steps={steps}",
            "train.logging_steps=1", "train.checkpointing_steps=0", "train.report_to=tensorboard",
            "validation.validation_steps=0", "validation.num_inference_steps=2", f"train.output_dir={out}"]


def read_step_times(out: str, skip: int) -> list[float]:
    """The `step_time` the trainer logged to tensorboard in `out`, without the first `skip` steps."""
    events = EventAccumulator(str(next(Path(out, "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return [e.value for e in events.Scalars("step_time")][skip:]


def trainer_step_times(config_path: str | None, overrides: list[str], steps: int, out: str) -> list[float]:
    """The trainer's step times, run in this process."""
    trainer.main(trainer_args(config_path, overrides, steps + WARMUP, out))
    return read_step_times(out, WARMUP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    torch.set_num_threads(config.train.cpu_threads or len(os.sched_getaffinity(0)))

    floor = Floor(config)
    floor_before = statistics.median(floor.times(args.steps // 2))
    with tempfile.TemporaryDirectory() as out:
        trainer_times = trainer_step_times(args.config, args.overrides, args.steps, out)
    floor_after = statistics.median(floor.times(args.steps // 2))
    step, floor_step = statistics.median(trainer_times), min(floor_before, floor_after)
    batch = config.train.train_batch_size * config.train.gradient_accumulation_steps
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("\n| config | batch | precision | threads | trainer step | floor step | ratio | samples/s | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {Path(args.config).name} | {batch} | {config.train.mixed_precision} | {torch.get_num_threads()} | "
          f"{step * 1000:.0f} ms | {floor_step * 1000:.0f} ms (before {floor_before * 1000:.0f}, after "
          f"{floor_after * 1000:.0f}) | {step / floor_step:.3f} | {batch / step:.1f} | {peak_mib:.0f} MiB |")


if __name__ == "__main__":
    main()
