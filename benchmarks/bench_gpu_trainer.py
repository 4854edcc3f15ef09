"""The trainer itself on a GPU at Stable Diffusion 1.5 shape: LoRA rank 4, batch 8, 512 px, bf16, the encodings
cached (`data.cache`), on the built-in data; plain, with `train.gradient_checkpointing`, with xformers attention
(an error in the results where xformers is not installed), with `train.compile`, and
plain but logging every 20 steps (the recipe's `train.logging_steps`) instead of every step.

It writes a randomly initialised SD-1.5-shaped base (bench_gpu.py's configs, a character-level CLIP tokenizer: no
download), runs `finetune/train.py` once per variant in a subprocess, and reads the per-step `step_time` the
trainer logs (the median over the logging windows after the first two epochs, when every encoding is cached) and
the peak GPU memory from its end-of-run summary. bench_gpu.py's `cached` variant is the bare floor of the same
step; like it, a run logging every step waits for the GPU at the end of each step. `--sync-debug` also runs the
plain variant under CUDA's sync debug mode and lists the lines of code where the host waited for the GPU.

    python benchmarks/bench_gpu_trainer.py --out OUT_DIR [--tiny] [--steps 60] [--skip compile ...] [--sync-debug]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from bench_gpu import SD15, SD15_SCHEDULER, TINY  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from tests.conftest import clip_tokenizer  # noqa: E402

VARIANTS = {"plain": [], "ckpt": ["train.gradient_checkpointing=true"],
            "xformers": ["train.enable_xformers_memory_efficient_attention=true"], "compile": ["train.compile=true"],
            "log20": ["train.logging_steps=20"]}
SAMPLES = 64  # 8 batches an epoch: from the second epoch on, every step trains from the cache
WARM_STEPS = 2 * SAMPLES // 8  # steps of the first two epochs, left out of the timing
# Runs the trainer with CUDA's sync debug mode on: each line that makes the host wait for the GPU warns (once).
SYNC_DEBUG = ("import runpy, sys, torch; torch.cuda.set_sync_debug_mode('warn'); sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")


def write_base(folder: Path, shape) -> Path:
    """A randomly initialised SD-shaped pipeline folder, as `model.pretrained_model_name_or_path` loads one."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / "vocab")
    text = {**shape.text, "vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**shape.vae), text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**shape.unet), scheduler=DDPMScheduler(**SD15_SCHEDULER, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def run_trainer(base: Path, out: Path, resolution: int, steps: int, extra: list[str], sync_debug: bool = False,
                profile: Path | None = None) -> dict:
    overrides = [
        f"model.pretrained_model_name_or_path={base}", "model.train_text_encoder=false",
        "data.source=builtin", f"data.path={out.parent / 'shapes'}", "data.resampled=false",
        f"data.num_samples={SAMPLES}", f"data.resolution={resolution}", "data.cache=true", "data.random_flip=false",
        "data.filters.min_width=null", "data.filters.min_height=null", "data.filters.min_aesthetic=null",
        "data.num_workers=1", "lora.rank=4", "lora.alpha=4", "train.train_batch_size=8",
        f"train.max_train_steps={steps}", "train.logging_steps=1", "train.checkpointing_steps=0",
        "train.resume_from_checkpoint=null", "train.mixed_precision=bf16", f"train.output_dir={out}",
        "validation.num_inference_steps=4", "validation.num_images_per_prompt=1", "validation.validation_steps=0",
        *extra]
    start = time.perf_counter()
    python = [sys.executable, "-W", "default", "-c", SYNC_DEBUG] if sync_debug else [sys.executable]
    if profile:
        python += [str(ROOT / "benchmarks" / "trace_trainer.py"), str(profile), "--wait", str(WARM_STEPS + 4), "--"]
    result = subprocess.run([*python, str(ROOT / "finetune" / "train.py"), "--config",
                             str(ROOT / "configs" / "sd15-lora-laion.yaml"), *overrides],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"error": (result.stdout + result.stderr)[-3000:], "wall_s": round(wall, 1)}
    if profile:
        return {"report": str(profile), "head": profile.read_text().splitlines()[:2], "wall_s": round(wall, 1)}
    if sync_debug:  # "FILE:LINE: UserWarning: called a synchronizing CUDA operation", then the line itself
        lines = result.stderr.splitlines()
        return {"syncs": [f"{line.split(': UserWarning')[0]}: {lines[i + 1].strip() if i + 1 < len(lines) else ''}"
                          for i, line in enumerate(lines) if "synchronizing CUDA operation" in line],
                "wall_s": round(wall, 1)}
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = events.Scalars("step_time")
    if len(logged) < 2:
        return {"error": f"{len(logged)} step_time value(s) logged: run more steps", "wall_s": round(wall, 1)}
    every = logged[1].step - logged[0].step
    times = [e.value for e in logged if e.step - every >= WARM_STEPS]  # windows after two epochs: all cached
    memory = re.search(r"peak GPU memory ([\d.]+) GiB", result.stdout)
    median = statistics.median(times)
    return {"median_ms": round(1000 * median, 1), "images_per_s": round(8 / median, 1), "windows_timed": len(times),
            "steps_per_window": every, "peak_gib": float(memory[1]) if memory else None, "wall_s": round(wall, 1),
            "summary": next(line for line in result.stdout.splitlines() if line.startswith("trained "))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="shrunk shapes, for a check on a CPU")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", nargs="*", default=[], choices=list(VARIANTS))
    parser.add_argument("--sync-debug", action="store_true", help="also list where the plain run syncs (CUDA)")
    parser.add_argument("--profile", action="store_true", help="also profile the plain run (trace_trainer.py)")
    args = parser.parse_args()
    shape, out = (TINY if args.tiny else SD15), Path(args.out)
    work = Path("/tmp/bench-gpu-trainer")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base = write_base(work / "base", shape)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "base_written_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(results), flush=True)
    runs = [(name, extra, False) for name, extra in VARIANTS.items() if name not in args.skip]
    extras = [("sync-debug", [], True)] * args.sync_debug + [("profile", [], False)] * args.profile
    for name, extra, sync_debug in runs[:1] + extras + runs[1:]:
        steps = args.steps + 40 if name == "log20" else WARM_STEPS + 16 if name in ("sync-debug", "profile") \
            else args.steps
        profile = out / "profile.txt" if name == "profile" else None
        results[name] = run_trainer(base, work / name, shape.resolution, steps, extra, sync_debug, profile)
        print(name, json.dumps(results[name]), flush=True)
        (out / "bench_gpu_trainer.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
