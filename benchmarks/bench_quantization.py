"""A quantized base for LoRA (`model.base_quantization`) on the CPU: the memory of SD-1.5's UNet at its real size,
and a LoRA step on it, per mode.

Each mode runs in its own process: SD-1.5's UNet built from its published config (860M weights, random values: the
memory and time do not depend on them), cast to bf16 (the training precision of a LoRA run on a GPU) and quantized
as the trainer does it (`finetune.quantization.quantize`); LoRA rank 4 on the cross-attention projections (the
trainer's default targets); then steps at 256 px (32x32 latents), batch 1, under bf16 autocast, on random
latents and a random 77-token text embedding. Reported: the UNet's weight bytes as stored (quantized tensors at
their packed size with their scales), the process's resident memory after quantizing and its peak during the steps
(Linux's VmHWM, reset before the steps), the median step time, and the loss on one fixed batch (same noise and
timesteps) against the unquantized bf16 UNet's: how far the quantized weights move what the adapters train on.

    python benchmarks/bench_quantization.py [--steps 3] [--sdxl] [--json benchmarks/results/quantization.json]

With --sdxl, also SDXL base 1.0's UNet (2.6B weights, built in bf16) quantized per mode: its weight bytes only.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ["none", "int8", "fp8", "nf4"]


def rss(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def sdxl_weights(mode: str) -> dict:
    """SDXL base 1.0's UNet at its real size (2.6B weights, built in bf16), quantized: its weight bytes only."""
    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT))
    from finetune import quantization

    torch.set_num_threads(2)
    config = json.loads((ROOT / "finetune" / "base_configs" / "sdxl" / "unet" / "config.json").read_text())
    torch.set_default_dtype(torch.bfloat16)  # (built in bf16 directly: 5 GB, not 10)
    unet = UNet2DConditionModel.from_config(config).requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    if mode != "none":
        quantization.quantize(unet, mode, torch.bfloat16, torch.device("cpu"))
    return {"unet_weight_bytes": quantization.weight_bytes(unet)}


def measure(mode: str, steps: int) -> dict:
    """One mode, in this process."""
    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT))
    from finetune import quantization
    from finetune.config import LoraConfig
    from finetune.lora import peft_config

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = json.loads((ROOT / "finetune" / "base_configs" / "sd15" / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel.from_config(config).to(torch.bfloat16).requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 77, 768, generator=generator)
    noise, timesteps = torch.randn(1, 4, 32, 32, generator=generator), torch.tensor([500])
    if mode != "none":
        quantization.quantize(unet, mode, torch.bfloat16, torch.device("cpu"))
    weight_bytes, resident = quantization.weight_bytes(unet), rss("VmRSS")
    unet.add_adapter(peft_config(4, 4, LoraConfig().target_modules, LoraConfig()))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        fixed_loss = torch.nn.functional.mse_loss(unet(latents + noise, timesteps, text).sample.float(), noise).item()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the steps alone
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16):
            loss = torch.nn.functional.mse_loss(unet(latents + noise, timesteps, text).sample.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"unet_weight_bytes": weight_bytes, "rss_after_quantizing": resident, "peak_rss_in_steps": rss("VmHWM"),
            "step_seconds": statistics.median(times[1:] or times), "fixed_batch_loss": fixed_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--sdxl", action="store_true", help="also SDXL's UNet's weight bytes per mode (no steps)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in a child process
    parser.add_argument("--sdxl-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.steps)))
        return
    if args.sdxl_mode:
        print(json.dumps(sdxl_weights(args.sdxl_mode)))
        return
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": 2}, "steps": args.steps,
               "modes": {}}
    for mode in MODES:
        child = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)],
                               capture_output=True, text=True, check=True)
        results["modes"][mode] = json.loads(child.stdout.strip().splitlines()[-1])
        print(mode, results["modes"][mode], flush=True)
    for mode in MODES if args.sdxl else []:
        child = subprocess.run([sys.executable, __file__, "--sdxl-mode", mode], capture_output=True, text=True,
                               check=True)
        results.setdefault("sdxl_unet", {})[mode] = json.loads(child.stdout.strip().splitlines()[-1])
        print("sdxl", mode, results["sdxl_unet"][mode], flush=True)
    reference = results["modes"]["none"]["fixed_batch_loss"]
    for values in results["modes"].values():
        values["loss_gap_vs_bf16"] = values["fixed_batch_loss"] - reference
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
