"""Each `lora.type` on the same LoRA step: step time, trainable weights, the adapter file's size and the step's peak
memory.

The job: a base with SD-1.5's real block layout (its published configs, widths shrunk as the tests build it,
`tests/conftest.py build_sd15_shaped`) at 64 px (8x8 latents), batch 8, fp32, rank 4 on the cross-attention
projections (the trainer's default targets), LoCon / LoHa / LoKr also on the ResNet convolutions at conv rank 4.
One process per type: the UNet with its adapters (`finetune.lora.attach`), AdamW, steps on random latents and
text; the median step after one warm-up, and Linux's VmHWM reset before the steps (the step's own peak).

    python benchmarks/bench_adapters.py [--steps 20] [--json benchmarks/results/adapters.json]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["lora", "dora", "locon", "loha", "lokr"]


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmHWM")


def measure(kind: str, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from finetune import lora
    from finetune.config import LoraConfig, ModelConfig
    from finetune.models import load_components
    from tests.conftest import build_sd15_shaped

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        components = load_components(ModelConfig(pretrained_model_name_or_path=str(
            build_sd15_shaped(Path(tmp) / "base"))))
        config = LoraConfig(enabled=True, type=kind, rank=4, conv_rank=4 if kind in ("locon", "loha", "lokr")
                            else None)
        unet = lora.attach(components, config)[0]
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        latents, text = torch.randn(8, 4, 8, 8, generator=generator), torch.randn(8, 77, 16, generator=generator)
        timesteps = torch.randint(0, 1000, (8,), generator=generator)
        Path("/proc/self/clear_refs").write_text("5")
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            loss = unet(latents, timesteps, text).sample.pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        peak = peak_rss()
        out = Path(tmp) / "out"
        out.mkdir()
        lora.save_run(out, components, config)
        files = {path.name: path.stat().st_size for path in out.glob("*.safetensors")}
    return {"step_ms": round(1000 * statistics.median(times[1:]), 2), "trainable": sum(p.numel() for p in params),
            "peak_rss_in_steps": peak, "files": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--type", help=argparse.SUPPRESS)  # one type, in a child process
    args = parser.parse_args()
    if args.type:
        print(json.dumps(measure(args.type, args.steps)))
        return
    results = {"steps": args.steps, "types": {}}
    for kind in TYPES:
        child = subprocess.run([sys.executable, __file__, "--type", kind, "--steps", str(args.steps)],
                               capture_output=True, text=True, check=True)
        results["types"][kind] = json.loads(child.stdout.strip().splitlines()[-1])
        print(kind, results["types"][kind], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
