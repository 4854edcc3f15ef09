"""The shipped SD-1.5 LoRA recipe against diffusers' unmodified `train_text_to_image_lora.py`, per step (issue 17).

Both train the same tiny SD-1.x-shaped base (`bench_all.build_tiny_sd`) on the same 512 images of 128 px (the
built-in shapes drawn at 64 px and upscaled, an imagefolder with metadata.jsonl), batch 8, LoRA rank 4 (alpha 4) on
to_q, to_k, to_v, to_out.0, fp32 (or both bf16 mixed precision, as the recipe ships, with --precision bf16), random
flips, centre crops, no checkpoints or validation (ours draws its grids once, in 2 steps), one process each, torch's
threads as they come. Ours is `configs/sd15-lora-laion.yaml` with data and size overrides only (source, path,
caption column, resolution, the size filters and buckets that 128 px images fail, workers, batch, rank, steps, and
the precision: fp32 unless --precision bf16), run as shipped (no cache) and with
`data.cache=true`. A step's time is the difference of two whole runs of different lengths over the step
difference, so start-up, loading and saving cancel:
- the example: 16 and 64 steps (every step encodes the images and captions);
- ours, the first epoch (the one that fills the cache; an epoch is 64 steps): 16 and 64 steps;
- ours with the cache, later epochs: 80 and 160 steps (every step between is in epoch 2 or 3).
Each repeat runs every configuration once, the sides alternating; the medians over repeats are reported.

    python benchmarks/bench_recipe.py --example train_text_to_image_lora.py [--repeats 2] [--precision bf16] \
        [--json OUT]

The example imports torchvision: run this in an environment that has it, both sides in that one (on this project's
machines, a new venv with `pip install torch==2.14.1 torchvision==0.29.1`, then `pip install -e . datasets pytest`).
"""

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_all import build_tiny_sd  # noqa: E402
from bench_step import ROOT  # noqa: E402

from finetune.data import shapes  # noqa: E402

IMAGES, RESOLUTION, BATCH, RANK = 512, 128, 8, 4
EPOCH = IMAGES // BATCH
RECIPE = ROOT / "configs" / "sd15-lora-laion.yaml"


def write_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(IMAGES):
        png, caption, _ = shapes.render_sample(index, seed=0)
        image = Image.open(io.BytesIO(png)).convert("RGB")
        image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC).save(folder / f"{index:04d}.png")
        rows.append(json.dumps({"file_name": f"{index:04d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def ours(base: Path, images: Path, out: Path, steps: int, cache: bool, precision: str) -> list[str]:
    return [sys.executable, str(ROOT / "finetune" / "train.py"), "--config", str(RECIPE),
            f"model.pretrained_model_name_or_path={base}", "data.source=imagefolder", f"data.path={images}",
            "data.resampled=false", "data.caption_column=text", f"data.resolution={RESOLUTION}",
            "data.buckets=false", "data.filters.min_width=null", "data.filters.min_height=null",
            "data.filters.on_missing=keep", "data.num_samples=null", "data.num_workers=0",
            "data.persistent_workers=false", f"data.cache={str(cache).lower()}", f"train.train_batch_size={BATCH}",
            f"lora.rank={RANK}", f"lora.alpha={RANK}", f"train.max_train_steps={steps}",
            f"train.mixed_precision={precision}", "train.checkpointing_steps=0", "validation.validation_steps=0",
            "validation.num_inference_steps=2",
            f"train.output_dir={out}"]


def example(script: Path, base: Path, images: Path, out: Path, steps: int, cache: Path, precision: str) -> list[str]:
    return [sys.executable, str(script), f"--pretrained_model_name_or_path={base}", f"--train_data_dir={images}",
            f"--resolution={RESOLUTION}", "--center_crop", "--random_flip", f"--train_batch_size={BATCH}",
            f"--rank={RANK}", f"--max_train_steps={steps}", "--learning_rate=1e-4", "--checkpointing_steps=1000000",
            "--seed=0", "--dataloader_num_workers=0", f"--output_dir={out}", f"--cache_dir={cache}",
            f"--mixed_precision={precision}"]


def timed(command: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as output:
        subprocess.run(command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", type=Path, required=True, help="diffusers' train_text_to_image_lora.py")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no",
                        help="both sides: fp32 (no), or bf16 mixed precision as the recipe ships")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    base, images = build_tiny_sd(work / "base"), write_images(work / "images")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "FINETUNE_CACHE": str(work / "finetune-cache")}
    runs = {"example": (16, 64), "ours as shipped": (16, 64), "ours cached, first epoch": (16, 64),
            "ours cached, later epochs": (80, 160)}

    def command(name: str, steps: int, out: Path) -> list[str]:
        if name == "example":
            return example(args.example, base, images, out, steps, work / "datasets-cache", args.precision)
        return ours(base, images, out, steps, "cached" in name, args.precision)

    timed(command("example", 2, work / "warm"), env, work / "warm-example.log")  # (datasets' arrow cache)
    timed(command("ours as shipped", 2, work / "warm"), env, work / "warm-ours.log")
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for name in order:
            short, long = runs[name]
            times = [timed(command(name, steps, work / f"{name}-{steps}-{repeat}".replace(" ", "_")), env,
                           work / f"{name}-{steps}-{repeat}.log".replace(" ", "_").replace(",", ""))
                     for steps in (short, long)]
            seconds[name].append((times[1] - times[0]) / (long - short))
            print(f"repeat {repeat}: {name}: {seconds[name][-1] * 1000:.0f} ms a step", flush=True)
    step = {name: statistics.median(values) for name, values in seconds.items()}
    report = {
        "what": __doc__.split("\n")[0], "images": IMAGES, "resolution": RESOLUTION, "batch": BATCH, "rank": RANK,
        "precision": args.precision,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "example": str(args.example), "seconds_per_step": {k: [round(v, 4) for v in vs] for k, vs in seconds.items()},
        "median_seconds_per_step": {k: round(v, 4) for k, v in step.items()},
        "samples_per_s": {k: round(BATCH / v, 2) for k, v in step.items()},
        "ours_vs_example": {k: round(step["example"] / v, 3) for k, v in step.items() if k != "example"},
        "logs": str(work),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
