"""Issue 7's benchmark suite: every speed and memory target in one command, with a Markdown table at the end.

    python benchmarks/bench_all.py [--quick] [--only NAME ...] [--json OUT] [--threads N]

Each figure is a ratio of two things timed side by side in this run, so it holds on a noisy shared machine: the
side it is compared with (a floor, a reference, a peak) is measured before and after, and the faster of its two
medians is used, so a neighbour's load can only make a ratio look worse. Step times are medians.

  step        (1) the trainer's step over the bare floor (bench_step.Floor: UNet forward + backward + AdamW on
              fixed tensors, same batch, precision and trainable parameters, nothing else), for (a) the default
              run (configs/shapes.yaml) and (b) LoRA on a tiny Stable-Diffusion-shaped latent base (SD 1.x's
              4-level UNet, 4-level VAE and CLIP text encoder with every width shrunk about 10x; 128 px images,
              16x16 latents, batch 8) trained through finetune/train.py with data.cache. Its precision (fp32 or
              bf16 autocast) is whichever floor is faster here, measured first. Target: at most 1.05.
  reference   (2) samples/s of that LoRA job in the trainer over the same job done the way diffusers'
              examples/text_to_image/train_text_to_image_lora.py does it (written out below: fp32, VAE and text
              encoder every step, no cache, a plain DataLoader). Target: at least 2x. The full run also times the
              trainer with train.compile (about 3 minutes of compilation on two cores), a lever beyond the issue's
              caching and bf16; --no-compile leaves it out.
  sampling    (3) TextToImageDDPMPipeline(prompts, guidance_scale=2, num_inference_steps=25 / 50, output_type="np")
              of the default model (12 images) over a bare loop of batched-CFG UNet calls + scheduler.step on the
              same noise and precomputed embeddings. Target: at most 1.03.
  efficiency  (4) FLOPs of one floor step (FlopCounterMode: forward + backward) / the trainer's step time, as a
              share of this machine's matmul peak measured in the same run (torch.mm on 2048^2 matrices, same
              threads; the bf16 peak, or the fp32 one where that is higher: without AMX a CPU can multiply bf16
              slower than fp32), for both runs of (1). Target: at least 30%.
  memory      (5) peak RSS of the two trainer runs of (1) (each a subprocess: wait4's rusage is its own), and the
              peak GPU memory on a GPU. Reported, no target.

Trainer runs are subprocesses (`python -c` calling finetune.train.main, with train.cpu_threads set); the floors,
the reference loop and sampling run in this process, with the same thread count (--threads, default the cores, as
the trainer picks for one process). On a GPU everything runs there. Run it on a quiet machine: threads that share
their cores with other work wait on each other, and two threads can then be many times slower than one (on a
busy machine, --threads 1 gives steadier, if different, numbers). `--quick` runs a few steps of everything (about
2 minutes on two cores): it checks the suite, its numbers are indicative only. The full run takes about 9
minutes on two cores, 3 of them compiling for the train.compile row (--no-compile: about 6).
"""

import argparse
import functools
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # not the torchvision notices of image processors unused here
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import ROOT, WARMUP, Floor, read_step_times, sync, timed, trainer_args  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from finetune.config import load_config  # noqa: E402
from finetune.data import shapes  # noqa: E402
from finetune.models import build_components  # noqa: E402
from tests.conftest import clip_tokenizer  # noqa: E402

diffusers_logging.set_verbosity_error()  # each dtype cast of a model otherwise warns
diffusers_logging.disable_progress_bar()  # saving and loading the tiny base: no bars between the progress lines
transformers_logging.disable_progress_bar()

START = time.perf_counter()
MEASURES = ("step", "reference", "sampling", "efficiency", "memory")
DEFAULT_CONFIG = str(ROOT / "configs" / "shapes.yaml")

# Stable Diffusion 1.x's shapes (unet/, vae/, text_encoder/ and scheduler/ configs) with the widths shrunk about
# 10x: UNet 320-640-1280-1280 -> 32-64-128-128, VAE 128-256-512-512 -> 12-24-48-48 (the VAE's width stays 0.4x the
# UNet's, so encoding a batch costs about what it does next to SD's UNet: 0.4x the FLOPs of a full UNet forward and
# backward here, 0.46x at SD 1.5's size), CLIP 768 wide x 12 layers -> 64 x 4. 8 attention heads as SD's
# `attention_head_dim=8` (diffusers' name for the head count).
SD_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128, 128),
               layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=64,
               attention_head_dim=8)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(12, 24, 48, 48), latent_channels=4,
              layers_per_block=2, norm_num_groups=4, sample_size=128, scaling_factor=0.18215)
SD_TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
               max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    steps_offset=1, clip_sample=False)

# The LoRA job: rank-4 adapters on every attention projection (as train_text_to_image_lora.py), batch 8 of 128 px
# images (16x16 latents). 64 samples make an epoch of 8 steps, within the trainer's warm-up, so its caches are full
# by the time the timing starts, as they are for most of a real run.
LORA_RANK, LORA_TARGETS = 4, ["to_q", "to_k", "to_v", "to_out.0"]
LORA_BATCH, LORA_RESOLUTION, LORA_SAMPLES = 8, 128, 64
LORA_WARMUP = LORA_SAMPLES // LORA_BATCH + 2

# Sampling: a batch like two rows of the validation grid.
SAMPLING_PROMPTS, SAMPLING_PER_PROMPT, SAMPLING_GUIDANCE = 2, 6, 2.0

PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
TARGETS = {"step": 1.05, "reference": 2.0, "sampling": 1.03, "efficiency": 0.30}

# Runs a trainer in a subprocess; writes its peak GPU memory (on a GPU) to argv[1] afterwards.
TRAINER_CHILD = """import json, sys, torch
from finetune import train
train.main(sys.argv[2:])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
open(sys.argv[1], "w").write(json.dumps({"cuda_peak_bytes": peak}))
"""


@dataclass(frozen=True)
class Sizes:
    """How many steps each side of each measure runs."""

    default_steps: int  # trainer steps timed, default run (after bench_step.WARMUP)
    default_floor_steps: int  # floor steps before and after it
    lora_steps: int  # trainer steps timed, LoRA run (after LORA_WARMUP)
    lora_floor_steps: int  # floor steps before (per precision, interleaved) and after it
    reference_steps: int  # reference-loop steps before and after it
    compiled: bool  # also time the LoRA trainer with train.compile
    sampling_repeats: int  # pipeline / bare-loop pairs per step count
    matmul_repeats: int


FULL = Sizes(default_steps=200, default_floor_steps=60, lora_steps=200, lora_floor_steps=40, reference_steps=50,
             compiled=True, sampling_repeats=5, matmul_repeats=20)
QUICK = Sizes(default_steps=12, default_floor_steps=6, lora_steps=10, lora_floor_steps=4, reference_steps=5,
              compiled=False, sampling_repeats=1, matmul_repeats=5)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def stats(times: list[float]) -> dict:
    """Median, mean, min and max in ms, and the count."""
    ms = [t * 1000 for t in times]
    return {"median_ms": round(statistics.median(ms), 2), "mean_ms": round(statistics.mean(ms), 2),
            "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2), "n": len(ms)}


def row(measure: str, ours: str, reference: str, ratio: float | None, target: str, passed: bool | None) -> dict:
    return {"measure": measure, "ours": ours, "reference": reference, "ratio": ratio, "target": target,
            "result": {True: "pass", False: "FAIL", None: "-"}[passed]}


# ---- the trainer in a subprocess -----------------------------------------------------------------------------


def run_trainer(argv: list[str], out: Path, skip: int, env: dict | None = None) -> dict:
    """Run finetune.train.main(argv) in a child process; its step times (without the first `skip`), its peak RSS
    (wait4's rusage: this child's alone) and its peak GPU memory. The child's output goes to `out`.log."""
    report, log_path = out.with_suffix(".json"), out.with_suffix(".log")
    start = time.perf_counter()
    with open(log_path, "w") as output:
        child = subprocess.Popen([sys.executable, "-c", TRAINER_CHILD, str(report), *argv], cwd=ROOT,
                                 stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"the trainer exited with {child.returncode}; the end of its output:\n{tail}")
    times = read_step_times(str(out), skip)
    return {"times": times, "step": stats(times), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "cuda_peak_bytes": json.loads(report.read_text())["cuda_peak_bytes"],
            "wall_s": round(time.perf_counter() - start, 1), "argv": argv}


# ---- the tiny Stable-Diffusion-shaped base and the reference script's loop ------------------------------------


def lora_overrides(folder: Path, precision: str, threads: int) -> list[str]:
    """The trainer's overrides for the LoRA job on the base in `folder`."""
    return [f"model.pretrained_model_name_or_path={folder}", "model.train_text_encoder=false",
            "lora.enabled=true", f"lora.rank={LORA_RANK}", f"lora.target_modules=[{', '.join(LORA_TARGETS)}]",
            f"data.num_samples={LORA_SAMPLES}", f"data.resolution={LORA_RESOLUTION}", "data.cache=true",
            f"train.train_batch_size={LORA_BATCH}", "train.use_ema=false", f"train.mixed_precision='{precision}'",
            f"train.cpu_threads={threads}", "validation.num_images_per_prompt=1", "validation.process_strips=false"]


def build_tiny_sd(folder: Path, unet: dict = SD_UNET) -> Path:
    """Save a randomly initialised SD-shaped pipeline (SD_* shapes, or another UNet config; an offline
    character-level CLIPTokenizer)."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / (folder.name + "-vocab"))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **SD_TEXT))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD_VAE), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**unet), scheduler=DDPMScheduler(**SD_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


class ShardImages(torch.utils.data.Dataset):
    """The built-in samples as the reference script reads a dataset: each item decoded, resized (bilinear),
    cropped to `resolution`, scaled to [-1, 1] and its caption tokenised, when the DataLoader asks for it."""

    def __init__(self, folder: Path, resolution: int, tokenizer):
        self.resolution, self.tokenizer, self.samples = resolution, tokenizer, []
        for shard in sorted(folder.glob("*.tar")):
            with tarfile.open(shard) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
            for name in sorted(n for n in members if n.endswith(".png")):
                self.samples.append((members[name], members[name[:-4] + ".txt"].decode()))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        png, caption = self.samples[index]
        image = Image.open(io.BytesIO(png)).convert("RGB")
        scale = self.resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1) * 2 - 1
        ids = self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}


class ReferenceLoop:
    """The LoRA job the way diffusers' examples/text_to_image/train_text_to_image_lora.py runs it with its defaults:
    models loaded in fp32, the UNet frozen with `unet.add_adapter(LoraConfig(r, lora_alpha=r, gaussian init, the
    attention projections))`, a shuffling DataLoader without workers over ShardImages, and at every step the VAE
    encode of the batch (`latent_dist.sample() * scaling_factor`), the text encoder, noise, timesteps, the UNet, MSE
    on epsilon, backward, gradient clipping at 1.0, AdamW (lr 1e-4, weight decay 1e-2), the constant LR schedule
    and `loss.item()` for its running loss."""

    def __init__(self, folder: Path, data: Path, device: torch.device):
        self.device = device
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(device)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").to(device)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        for model in (self.unet, self.vae, self.text_encoder):
            model.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS))
        self.unet.to(device).train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", self.optimizer)
        dataset = ShardImages(data, LORA_RESOLUTION, self.tokenizer)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=LORA_BATCH, shuffle=True, num_workers=0)
        self.batches, self.train_loss = self._endless(), 0.0

    def _endless(self):
        while True:
            yield from self.loader

    def step(self) -> None:
        batch = next(self.batches)
        latents = self.vae.encode(batch["pixel_values"].to(self.device)).latent_dist.sample()
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=self.device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(batch["input_ids"].to(self.device), return_dict=False)[0]
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.train_loss += loss.item()

    def times(self, steps: int, warmup: int) -> list[float]:
        """Seconds of each step, data loading included (as the trainer's step_time), after `warmup` ones."""
        return timed(self.step, self.device, steps, warmup)


# ---- the runs the measures share ------------------------------------------------------------------------------


class Suite:
    """The two trainer runs with their floors (and the reference loop), each done once, on first use, and the
    matmul peaks, measured whenever asked."""

    def __init__(self, sizes: Sizes, threads: int, work: Path, with_reference: bool):
        self.sizes, self.threads, self.work, self.with_reference = sizes, threads, work, with_reference
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.peaks: list[dict] = []

    @functools.cached_property
    def default_run(self) -> dict:
        """configs/shapes.yaml as shipped: floor, trainer (subprocess), floor."""
        overrides = [f"train.cpu_threads={self.threads}", "validation.process_strips=false"]
        config = load_config(DEFAULT_CONFIG, overrides)
        floor = Floor(config, device=self.device)
        steps = self.sizes.default_floor_steps
        log(f"default: floor x {steps} (batch {config.train.train_batch_size}, "
            f"{PRECISION_NAMES[config.train.mixed_precision]})")
        before = floor.times(steps)
        log(f"default: trainer x {self.sizes.default_steps} + {WARMUP} warm-up (subprocess)")
        out = self.work / "default"
        trainer = run_trainer(trainer_args(DEFAULT_CONFIG, overrides, self.sizes.default_steps + WARMUP, str(out)),
                              out, WARMUP)
        log(f"default: floor x {steps}")
        after = floor.times(steps)
        return self._summary("default (shapes.yaml)", config, floor, before, after, trainer)

    @functools.cached_property
    def lora_run(self) -> dict:
        """LoRA on the tiny SD base: the floor in fp32 and bf16 (interleaved; the faster precision is the run's),
        the reference loop, the trainer (subprocess), the reference loop again, the floor again."""
        folder = build_tiny_sd(self.work / "tiny-sd")
        data = Path(shapes.ensure_shards(None, LORA_SAMPLES)).parent
        configs = {p: load_config(None, self._lora_overrides(folder, p)) for p in ("no", "bf16")}
        floors = {p: Floor(config, device=self.device) for p, config in configs.items()}
        probe = {p: [] for p in floors}
        log(f"lora: floor x {self.sizes.lora_floor_steps} in fp32 and in bf16, interleaved")
        for _ in range(2):
            for p, floor in floors.items():
                probe[p] += floor.times(self.sizes.lora_floor_steps // 2 or 1, warmup=2)
        precision = min(probe, key=lambda p: statistics.median(probe[p]))
        floor, config = floors[precision], configs[precision]
        medians = {p: stats(times)["median_ms"] for p, times in probe.items()}
        log(f"lora: precision {PRECISION_NAMES[precision]} (floor medians: fp32 {medians['no']} ms, bf16 "
            f"{medians['bf16']} ms)")

        reference, ref_times = None, []
        if self.with_reference:
            reference = ReferenceLoop(folder, data, self.device)
            log(f"lora: reference loop x {self.sizes.reference_steps}")
            ref_times.append(reference.times(self.sizes.reference_steps, warmup=2))
        log(f"lora: trainer x {self.sizes.lora_steps} + {LORA_WARMUP} warm-up (subprocess)")
        out = self.work / "lora"
        argv = trainer_args(None, self._lora_overrides(folder, precision), self.sizes.lora_steps + LORA_WARMUP,
                            str(out))
        trainer = run_trainer(argv, out, LORA_WARMUP)
        compiled = None
        if reference is not None and self.sizes.compiled:
            log(f"lora: trainer with train.compile x {self.sizes.lora_steps} + {LORA_WARMUP} warm-up (subprocess)")
            out = self.work / "lora-compiled"
            # A fresh inductor cache: the compilation a first run pays (a later one reuses the kernels on disk).
            compiled = run_trainer(trainer_args(None, [*self._lora_overrides(folder, precision), "train.compile=true"],
                                                self.sizes.lora_steps + LORA_WARMUP, str(out)), out, LORA_WARMUP,
                                   env={"TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor-cache")})
            compiled["compile_s"] = round(compiled["wall_s"] - trainer["wall_s"], 1)  # the same steps otherwise
        if reference is not None:
            log(f"lora: reference loop x {self.sizes.reference_steps}")
            ref_times.append(reference.times(self.sizes.reference_steps, warmup=1))
        log(f"lora: floor x {self.sizes.lora_floor_steps}")
        after = floor.times(self.sizes.lora_floor_steps, warmup=1)
        summary = self._summary("SD-shaped LoRA", config, floor, probe[precision], after, trainer)
        summary["floor_by_precision"] = {p: stats(times) for p, times in probe.items()}
        if reference is not None:
            medians = [statistics.median(t) for t in ref_times]
            summary["reference"] = {"before": stats(ref_times[0]), "after": stats(ref_times[1]),
                                    "step_s": min(medians), "precision": "no",
                                    "samples_per_s": LORA_BATCH / min(medians)}
        if compiled is not None:
            summary["compiled"] = {"step": compiled["step"], "compile_s": compiled["compile_s"],
                                   "samples_per_s": LORA_BATCH / compiled["step"]["median_ms"] * 1000,
                                   "peak_rss_mib": compiled["peak_rss_mib"], "wall_s": compiled["wall_s"]}
        return summary

    def _lora_overrides(self, folder: Path, precision: str) -> list[str]:
        return lora_overrides(folder, precision, self.threads)

    def _summary(self, name: str, config, floor: Floor, before: list[float], after: list[float],
                 trainer: dict) -> dict:
        floor_s = min(statistics.median(before), statistics.median(after))
        step_s = statistics.median(trainer["times"])
        return {"name": name, "batch": config.train.train_batch_size, "precision": floor.precision,
                "precision_name": PRECISION_NAMES[floor.precision],
                "resolution": config.data.resolution, "threads": self.threads, "device": str(self.device),
                "floor_before": stats(before), "floor_after": stats(after), "floor_s": floor_s, "step_s": step_s,
                "ratio": step_s / floor_s, "samples_per_s": config.train.train_batch_size / step_s,
                "floor_flops": floor.flops(), "trainer": trainer}

    def measure_peaks(self) -> dict:
        """The matmul peak of this machine now: median FLOP/s of torch.mm on n x n matrices, bf16 and fp32."""
        n = 8192 if self.device.type == "cuda" else 2048
        peak = {"n": n}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            a, b = (torch.randn(n, n, device=self.device, dtype=dtype) for _ in range(2))
            times = []
            for _ in range(self.sizes.matmul_repeats + 2):
                sync(self.device)
                start = time.perf_counter()
                torch.mm(a, b)
                sync(self.device)
                times.append(time.perf_counter() - start)
            peak[f"{name}_flops_per_s"] = 2 * n**3 / statistics.median(times[2:])
        self.peaks.append(peak)
        log(f"matmul peak: bf16 {peak['bf16_flops_per_s'] / 1e9:.0f} GFLOP/s, fp32 "
            f"{peak['fp32_flops_per_s'] / 1e9:.0f} GFLOP/s")
        return peak


# ---- the measures ---------------------------------------------------------------------------------------------


def measure_step(suite: Suite) -> dict:
    rows = []
    for run in (suite.default_run, suite.lora_run):
        name = f"step / floor: {run['name']}, batch {run['batch']}, {run['resolution']} px, {run['precision_name']}"
        rows.append(row(name, f"{run['step_s'] * 1000:.0f} ms", f"{run['floor_s'] * 1000:.0f} ms", run["ratio"],
                        f"<= {TARGETS['step']}", run["ratio"] <= TARGETS["step"]))
    return {"rows": rows, "default": suite.default_run, "lora": suite.lora_run}


def measure_reference(suite: Suite) -> dict:
    run, reference = suite.lora_run, suite.lora_run["reference"]
    ratio = run["samples_per_s"] / reference["samples_per_s"]
    name = (f"samples/s: trainer ({run['precision_name']}, data.cache) / the diffusers LoRA script's way (fp32, "
            "encoders every step)")
    rows = [row(name, f"{run['samples_per_s']:.1f}/s", f"{reference['samples_per_s']:.1f}/s", ratio,
                f">= {TARGETS['reference']}", ratio >= TARGETS["reference"])]
    compiled = run.get("compiled")
    if compiled:
        ratio = compiled["samples_per_s"] / reference["samples_per_s"]
        rows.append(row(f"the same, the trainer with train.compile (compiling with an empty cache: "
                        f"{compiled['compile_s']:.0f} s more wall time)", f"{compiled['samples_per_s']:.1f}/s",
                        f"{reference['samples_per_s']:.1f}/s", ratio, f">= {TARGETS['reference']}",
                        ratio >= TARGETS["reference"]))
    return {"rows": rows, "ours_samples_per_s": run["samples_per_s"], **reference,
            **({"compiled": compiled} if compiled else {})}


class SamplingBench:
    """The default model's pipeline (built from configs/shapes.yaml; speed does not depend on trained weights) and
    the bare reverse loop on the same inputs: the same initial noise, the embeddings precomputed, the same seed for
    the scheduler's noise."""

    def __init__(self, device: torch.device):
        config = load_config(DEFAULT_CONFIG)
        torch.manual_seed(0)
        components = build_components(config.model, config.data.resolution, shapes.all_captions())
        self.pipe = components.pipeline().to(device)
        self.pipe.set_progress_bar_config(disable=True)  # as validation runs it
        self.pipe.unet.eval()
        self.pipe.text_encoder.eval()
        self.prompts = config.validation.texts[:SAMPLING_PROMPTS]
        self.images = len(self.prompts) * SAMPLING_PER_PROMPT
        size = config.data.resolution
        self.noise = torch.randn(self.images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():  # [unconditional; conditional], as the pipeline concatenates them
            self.cond = torch.cat([self.pipe.encode_prompt([""] * len(self.prompts), device),
                                   self.pipe.encode_prompt(self.prompts, device)])
        self.cond = self.cond.repeat_interleave(SAMPLING_PER_PROMPT, dim=0)

    def pipeline(self, steps: int, output_type: str = "np"):
        return self.pipe(self.prompts, num_images_per_prompt=SAMPLING_PER_PROMPT, guidance_scale=SAMPLING_GUIDANCE,
                         num_inference_steps=steps, generator=torch.Generator().manual_seed(1), latents=self.noise,
                         output_type=output_type).images

    @torch.no_grad()
    def bare(self, steps: int) -> torch.Tensor:
        """The reverse process alone: one UNet call on the doubled batch per step, guidance, scheduler.step."""
        unet, scheduler = self.pipe.unet, self.pipe.scheduler
        scheduler.set_timesteps(steps, device=self.noise.device)
        generator = torch.Generator().manual_seed(1)
        latents = self.noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=self.cond, return_dict=False)[0]
            uncond, text = pred.chunk(2)
            latents = scheduler.step(uncond + SAMPLING_GUIDANCE * (text - uncond), t, latents,
                                     generator=generator).prev_sample
        return latents


def measure_sampling(suite: Suite) -> dict:
    """The pipeline against the bare loop, interleaved (pipeline first in even repeats, bare first in odd ones)."""
    bench = SamplingBench(suite.device)
    # The two do the same work: their final latents agree (this also warms both up).
    difference = float((bench.pipeline(2, output_type="latent") - bench.bare(2)).abs().max())
    result = {"images": bench.images, "guidance_scale": SAMPLING_GUIDANCE, "max_abs_difference_2_steps": difference,
              "rows": []}
    for steps in (25, 50):
        log(f"sampling: {steps} steps, {bench.images} images, pipeline and bare loop x {suite.sizes.sampling_repeats}")
        times = {"pipeline": [], "bare": []}
        for repeat in range(suite.sizes.sampling_repeats):
            for side in ("pipeline", "bare") if repeat % 2 == 0 else ("bare", "pipeline"):
                sync(suite.device)
                start = time.perf_counter()
                getattr(bench, side)(steps)
                sync(suite.device)
                times[side].append(time.perf_counter() - start)
        pipeline_s, bare_s = statistics.median(times["pipeline"]), statistics.median(times["bare"])
        ratio, images = pipeline_s / bare_s, bench.images
        result[f"{steps}_steps"] = {"pipeline": stats(times["pipeline"]), "bare": stats(times["bare"]),
                                    "pipeline_images_per_s": images / pipeline_s, "bare_images_per_s": images / bare_s}
        result["rows"].append(row(f"sampling {steps} steps, {images} images, CFG {SAMPLING_GUIDANCE:g}: pipeline / "
                                  "bare UNet + scheduler loop", f"{pipeline_s:.2f} s ({images / pipeline_s:.1f} img/s)",
                                  f"{bare_s:.2f} s ({images / bare_s:.1f} img/s)", ratio,
                                  f"<= {TARGETS['sampling']}", ratio <= TARGETS["sampling"]))
    return result


def measure_efficiency(suite: Suite) -> dict:
    """FLOP/s of each trainer run (the floor step's FLOPs over the trainer's median step) as a share of the matmul
    peak: the bf16 one, or the fp32 one where that is higher (a CPU without AMX can multiply bf16 slower than fp32)."""
    suite.measure_peaks()  # (also measured at the start: the higher of the two counts)
    bf16 = max(p["bf16_flops_per_s"] for p in suite.peaks)
    fp32 = max(p["fp32_flops_per_s"] for p in suite.peaks)
    peak_name, peak = ("bf16", bf16) if bf16 >= fp32 else ("fp32", fp32)
    result = {"peaks": suite.peaks, "bf16_peak_flops_per_s": bf16, "fp32_peak_flops_per_s": fp32, "rows": []}
    for key, run in (("default", suite.default_run), ("lora", suite.lora_run)):
        achieved = run["floor_flops"] / run["step_s"]
        result[key] = {"flops_per_step": run["floor_flops"], "achieved_flops_per_s": achieved,
                       "floor_flops_per_s": run["floor_flops"] / run["floor_s"], "share_of_bf16_peak": achieved / bf16,
                       "share_of_fp32_peak": achieved / fp32}
        result["rows"].append(row(f"arithmetic efficiency: {run['name']} ({run['precision_name']}, "
                                  f"{run['floor_flops'] / 1e9:.1f} GFLOP/step) / matmul peak ({peak_name}; of bf16 "
                                  f"{achieved / bf16:.0%}, of fp32 {achieved / fp32:.0%})",
                                  f"{achieved / 1e9:.1f} GFLOP/s", f"{peak / 1e9:.0f} GFLOP/s", achieved / peak,
                                  f">= {TARGETS['efficiency']:.2f}", achieved / peak >= TARGETS["efficiency"]))
    return result


def measure_memory(suite: Suite) -> dict:
    result, rows = {}, []
    for key, run in (("default", suite.default_run), ("lora", suite.lora_run)):
        trainer = run["trainer"]
        result[key] = {"peak_rss_mib": trainer["peak_rss_mib"], "cuda_peak_bytes": trainer["cuda_peak_bytes"]}
        rows.append(row(f"peak RSS: {run['name']} trainer run", f"{trainer['peak_rss_mib']} MiB", "-", None, "-", None))
        if trainer["cuda_peak_bytes"] is not None:
            rows.append(row(f"peak GPU memory: {run['name']} trainer run",
                            f"{trainer['cuda_peak_bytes'] / 2**30:.2f} GiB", "-", None, "-", None))
    return {"rows": rows, **result}


MEASURE_FUNCTIONS = {"step": measure_step, "reference": measure_reference, "sampling": measure_sampling,
                     "efficiency": measure_efficiency, "memory": measure_memory}


# ---- the command ----------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = ["| measure | ours | reference | ratio | target | result |", "|---|---|---|---|---|---|"]
    for result in results.values():
        for r in result["rows"]:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            lines.append(f"| {r['measure']} | {r['ours']} | {r['reference']} | {ratio} | {r['target']} | "
                         f"{r['result']} |")
    return "\n".join(lines)


def machine(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cores": len(os.sched_getaffinity(0)),
            "threads": threads, "torch": torch.__version__, "cuda": torch.cuda.get_device_name()
            if torch.cuda.is_available() else None, "load_average_start": [round(v, 2) for v in os.getloadavg()]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps of everything: checks the suite, not speed")
    parser.add_argument("--only", nargs="+", choices=MEASURES, default=list(MEASURES), metavar="NAME",
                        help=f"run these measures only (of {', '.join(MEASURES)})")
    parser.add_argument("--json", help="write the results, per-step times included, to this file")
    parser.add_argument("--no-compile", action="store_true", help="leave out the LoRA trainer with train.compile")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads here and in the trainer runs (default: the cores, as the trainer)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    selected = [name for name in MEASURES if name in args.only]  # in this order: efficiency uses the runs' times

    results, settings = {}, {"quick": args.quick, "measures": selected, "machine": machine(args.threads)}
    with tempfile.TemporaryDirectory(prefix="bench-all-") as work:
        sizes = QUICK if args.quick else FULL
        sizes = replace(sizes, compiled=sizes.compiled and not args.no_compile)
        suite = Suite(sizes, args.threads, Path(work), "reference" in selected)
        load = os.getloadavg()[0]
        if load > 0.5:
            log(f"the machine is busy (load average {load:.1f}): ratios are indicative only. Threads that share "
                "cores with other work wait on each other: --threads 1 is steadier on a busy machine")
        if "efficiency" in selected:
            suite.measure_peaks()
        for name in selected:
            log(f"measure: {name}")
            results[name] = MEASURE_FUNCTIONS[name](suite)
            settings["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
            if args.json:
                Path(args.json).write_text(json.dumps({"settings": settings, "results": results}, indent=1,
                                                      default=str))
    settings["wall_s"] = round(time.perf_counter() - START, 1)
    print("\nRaw numbers (--json also keeps every step time):")
    print("\n".join(raw_lines({"settings": settings, **results})))
    print(f"\n{table(results)}", flush=True)


def raw_lines(value, prefix: str = "") -> list[str]:
    """`name.key: value` lines for the leaves of the results (step-time summaries on one line; the table rows,
    per-step times and trainer arguments left out)."""
    if isinstance(value, dict) and "median_ms" in value:
        return [f"{prefix}: median {value['median_ms']} ms, mean {value['mean_ms']}, min {value['min_ms']}, max "
                f"{value['max_ms']} (n {value['n']})"]
    if isinstance(value, dict):
        return [line for key, item in value.items() if key not in ("rows", "times", "argv")
                for line in raw_lines(item, f"{prefix}.{key}" if prefix else key)]
    if isinstance(value, float):
        return [f"{prefix}: {value:.4g}"]
    return [f"{prefix}: {json.dumps(value, default=str)}"]


if __name__ == "__main__":
    main()
