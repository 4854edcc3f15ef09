"""LoRA training and sampling at Stable Diffusion 1.5's shape on one GPU: images/s and peak memory per lever.

The models are built randomly initialised from config dicts (nothing is downloaded): the SD-1.5 UNet
(859.5M parameters), its VAE and the CLIP ViT-L/14 text encoder. Training follows diffusers'
`examples/text_to_image/train_text_to_image_lora.py`: LoRA rank 4 (alpha 4) on `to_q, to_k, to_v, to_out.0`,
base weights frozen in bf16, adapter weights fp32, AdamW, bf16 autocast, batch 8 at 512 px (64x64 latents),
DDPM noise at random timesteps, MSE on epsilon. Each variant runs in this one process after a warm-up; the step
time is the median over the measured steps (synchronised around each step), images/s is batch / median, and
peak memory is `torch.cuda.max_memory_allocated` after a reset at the start of the variant.

Standalone on purpose: it imports torch, diffusers, transformers and peft only (not `finetune` or
`pipelines`), so a bare GPU machine runs it with diffusers carried as a wheel.

    python benchmarks/bench_gpu.py --out bench_gpu.json                           # GPU, at most --time-budget (330 s)
    python benchmarks/bench_gpu.py --tiny --skip compile --out /tmp/bench.json    # every other path, CPU, ~20 s

On a GPU machine without diffusers, carry its wheel (`pip download --no-deps diffusers==0.42.1 -d .whl`) and run
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3 benchmarks/...`.
The JSON (--out) is rewritten after each variant, so a run cut short still leaves what it measured.

Variants, in the order they run (compile last, so a slow compile cannot cost the others):
  cached           (a) latents and text embeddings precomputed: the UNet step alone
  no-input-cast    (a) with peft's casts of the adapters' inputs to fp32 off (`disable_input_dtype_casting`; autocast
                   casts them back to bf16 at once), as the trainer runs a mixed-precision LoRA without dropout
  cudnn-benchmark  (a) with torch.backends.cudnn.benchmark = True
  ckpt             (c) (a) + unet.enable_gradient_checkpointing()
  xformers         (e) (a) + unet.enable_xformers_memory_efficient_attention(), when xformers imports
  encode           (b) the reference script's way: VAE encode of 512 px images + text encoder every step (bf16)
  fp32-tf32        (f) (a) in fp32 without autocast, TF32 on for matmuls and convolutions
  fp32             (f) (a) in fp32 without autocast, TF32 off (fewer steps: it is slow)
  full             (g) full fine-tuning: all UNet weights train, fp32 master weights, bf16 autocast, AdamW
  full-8bit        (h) (g) with bitsandbytes' 8-bit AdamW (`train.use_8bit_adam`), when bitsandbytes imports
  compile          (d) (a) + torch.compile(unet); compile time reported apart
and the measures: the bf16 matmul peak (8192^3), the FLOPs of one (a) step (FlopCounterMode) and so its
achieved TFLOP/s, and sampling (classifier-free guidance at batch 2x4, DDIM, 25 and 50 steps, bf16; the VAE
decode of the 4 images timed apart).
"""

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

START = time.perf_counter()  # The time budget counts the heavy imports below too.

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Nothing here needs the Hub; never wait on a network that is not there.

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.helpers import disable_input_dtype_casting  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

diffusers_logging.set_verbosity_error()  # Each dtype cast otherwise warns about modules kept in fp32 (there are none).

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5): unet/, vae/, text_encoder/ and scheduler/ configs.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD15_UNET_PARAMS = 859_520_964
SD15_LORA_PARAMS = 797_184  # rank 4 on to_q/to_k/to_v/to_out.0 of the 16 transformer blocks
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]

VARIANTS = ["cached", "no-input-cast", "cudnn-benchmark", "ckpt", "xformers", "encode", "fp32-tf32", "fp32", "full",
            "full-8bit", "compile"]
MEASURES = ["matmul", "flops", "sampling"]


@dataclass(frozen=True)
class Shape:
    """Model configs, image size and step counts of one benchmark size."""

    unet: dict
    vae: dict
    text: dict
    resolution: int
    matmul_n: int
    warmup: int
    steps: int
    slow_steps: int  # measured steps of the fp32-without-TF32 variant
    sampling_repeats: int
    sampling_steps: tuple[int, ...]
    expected_unet_params: int | None = None
    expected_lora_params: int | None = None


SD15 = Shape(SD15_UNET, SD15_VAE, SD15_TEXT, resolution=512, matmul_n=8192, warmup=5, steps=20, slow_steps=5,
             sampling_repeats=3, sampling_steps=(25, 50), expected_unet_params=SD15_UNET_PARAMS,
             expected_lora_params=SD15_LORA_PARAMS)
TINY = Shape(
    {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1,
     "cross_attention_dim": 32},
    {**SD15_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "sample_size": 64},
    {**SD15_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
     "vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 2},
    resolution=64, matmul_n=512, warmup=1, steps=2, slow_steps=1, sampling_repeats=1, sampling_steps=(2, 3),
)


class BudgetExceeded(BaseException):
    """Raised by SIGALRM when a variant runs past the time budget.

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` inside torch (dynamo wraps or swallows
    errors raised while it compiles) can catch it and carry on.
    """


def _raise_budget_exceeded(signum, frame):
    raise BudgetExceeded("stopped: the time budget ran out during this variant")


@contextlib.contextmanager
def deadline(seconds: float):
    """Interrupt the Python work inside (a compile, a hung step) after `seconds`, on Linux."""
    if not hasattr(signal, "setitimer"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_budget_exceeded)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**30, 2)


def memory_allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def timed_calls(fn, warmup: int, steps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds of each call, synchronised around it: (warm-up calls, measured calls)."""
    times = []
    for _ in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times[:warmup], times[warmup:]


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Batch:
    """One fixed batch: pixels and token ids for the encoders, and what they encode to (the cached path)."""

    pixels: torch.Tensor
    input_ids: torch.Tensor
    latents: torch.Tensor
    text: torch.Tensor


class TrainStep:
    """One step of the diffusers LoRA example: (encode), noise, UNet, MSE on epsilon, backward, AdamW."""

    def __init__(self, model, params, batch: Batch, noise_scheduler, autocast: bool, encoders=None, lr=1e-4,
                 optimizer_class=torch.optim.AdamW):
        self.model, self.params, self.batch, self.noise_scheduler = model, params, batch, noise_scheduler
        self.autocast, self.encoders = autocast, encoders
        self.optimizer = optimizer_class(params, lr=lr, weight_decay=1e-2)
        self.grads_ok: bool | None = None
        self.loss: torch.Tensor | None = None

    def __call__(self) -> None:
        latents, text = self.batch.latents, self.batch.text
        if self.encoders is not None:
            vae, text_encoder = self.encoders
            with torch.no_grad():
                latents = vae.encode(self.batch.pixels).latent_dist.sample() * vae.config.scaling_factor
                text = text_encoder(self.batch.input_ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = self.model(noisy, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        if self.grads_ok is None:  # Checked once: a setting that cuts the graph (checkpointing) shows here.
            self.grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in self.params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = loss.detach()


@dataclass
class Bench:
    """The models, the batch and the results of one run; one method per variant or measure."""

    args: argparse.Namespace
    shape: Shape
    device: torch.device
    results: dict = field(default_factory=dict)
    timed_out: bool = False
    tf32_defaults: tuple[bool, bool] = field(
        default_factory=lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    # Build models.
    def build(self) -> None:
        torch.manual_seed(0)
        start = time.perf_counter()
        try:  # Initialise on the device: random init of 1B parameters on the host takes a while.
            with self.device:
                self.unet, self.vae, self.text_encoder = self._build_models()
        except Exception as error:  # noqa: BLE001 - fall back to the host, say so
            log(f"building on {self.device} failed ({type(error).__name__}: {error}); building on the CPU")
            self.unet, self.vae, self.text_encoder = (m.to(self.device) for m in self._build_models())
        unet_params = sum(p.numel() for p in self.unet.parameters())
        self.noise_scheduler = DDPMScheduler(**SD15_SCHEDULER)
        self.unet.train()
        self.vae.requires_grad_(False).eval().to(dtype=torch.bfloat16)
        self.text_encoder.requires_grad_(False).eval().to(dtype=torch.bfloat16)

        # LoRA as train_text_to_image_lora.py: freeze, cast the base to bf16, add the adapter, upcast it to fp32.
        self.unet.requires_grad_(False).to(dtype=torch.bfloat16)
        lora_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        try:
            self.unet.add_adapter(lora_config)
            lora_via = "unet.add_adapter"
        except Exception as error:  # noqa: BLE001 - diffusers refuses a peft older than it wants; peft itself can
            log(f"unet.add_adapter failed ({type(error).__name__}: {error}); using peft.inject_adapter_in_model")
            inject_adapter_in_model(lora_config, self.unet)
            lora_via = f"peft.inject_adapter_in_model ({type(error).__name__} from add_adapter)"
        cast_training_params(self.unet, dtype=torch.float32)
        self.lora_params = [p for p in self.unet.parameters() if p.requires_grad]
        lora_count = sum(p.numel() for p in self.lora_params)
        models = {
            "unet_params": unet_params,
            "unet_params_expected": self.shape.expected_unet_params,
            "lora_params": lora_count,
            "lora_params_expected": self.shape.expected_lora_params,
            "lora_param_dtypes": sorted({str(p.dtype) for p in self.lora_params}),
            "vae_params": sum(p.numel() for p in self.vae.parameters()),
            "text_encoder_params": sum(p.numel() for p in self.text_encoder.parameters()),
            "attention_processor": type(next(iter(self.unet.attn_processors.values()))).__name__,
            "lora_via": lora_via,
            "build_s": round(time.perf_counter() - start, 2),
        }
        self.results["models"] = models
        log(f"UNet {unet_params:,} parameters (SD-1.5: {SD15_UNET_PARAMS:,}), LoRA {lora_count:,} "
            f"{models['lora_param_dtypes']}, VAE {models['vae_params']:,}, text encoder "
            f"{models['text_encoder_params']:,}; attention {models['attention_processor']}; built in "
            f"{models['build_s']} s")
        if self.shape.expected_unet_params and abs(unet_params / self.shape.expected_unet_params - 1) > 1e-3:
            log(f"WARNING: the UNet has {unet_params:,} parameters, not SD-1.5's {SD15_UNET_PARAMS:,}")

    def _build_models(self):
        return (UNet2DConditionModel(**self.shape.unet), AutoencoderKL(**self.shape.vae),
                CLIPTextModel(CLIPTextConfig(**self.shape.text)))

    # Build the batch: random pixels and token ids, encoded once for the cached path.
    def make_batch(self) -> None:
        size, res = self.args.batch, self.shape.resolution
        pixels = (torch.rand(size, 3, res, res, device=self.device) * 2 - 1).to(torch.bfloat16)
        input_ids = torch.randint(0, self.shape.text["vocab_size"], (size, 77), device=self.device)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
            text = self.text_encoder(input_ids, return_dict=False)[0]
        self.batch = Batch(pixels, input_ids, latents.float(), text.float())
        log(f"batch {size}: pixels {tuple(pixels.shape)}, latents {tuple(latents.shape)}, text {tuple(text.shape)}")

    def encoders_to(self, device) -> None:
        """The cached variants keep the VAE and text encoder off the GPU, as a cached-latents run would."""
        self.vae.to(device)
        self.text_encoder.to(device)

    def measure_training(self, step: TrainStep, warmup: int | None = None, steps: int | None = None) -> dict:
        warmup = self.shape.warmup if warmup is None else warmup
        steps = self.shape.steps if steps is None else steps
        start_bytes = memory_allocated(self.device)
        warm, times = timed_calls(step, warmup, steps, self.device)
        median = statistics.median(times)
        return {
            "images_per_s": round(self.args.batch / median, 2),
            "median_ms": round(median * 1e3, 2),
            "min_ms": round(min(times) * 1e3, 2),
            "max_ms": round(max(times) * 1e3, 2),
            "warmup_steps": warmup,
            "steps": steps,
            "warmup_s": round(sum(warm), 2),
            "start_gib": gib(start_bytes),
            "peak_gib": gib(peak_memory(self.device)),
            "loss": round(float(step.loss), 4),
            "grads_ok": step.grads_ok,
        }

    def lora_step(self, model=None, autocast=True, encoders=None) -> TrainStep:
        return TrainStep(self.unet if model is None else model, self.lora_params, self.batch, self.noise_scheduler,
                         autocast=autocast, encoders=encoders)

    # The variants.
    def variant_cached(self) -> dict:
        result = self.measure_training(self.lora_step())
        self.cached_median_s = result["median_ms"] / 1e3
        return result | {"notes": "UNet step alone: latents and text embeddings precomputed"}

    def variant_no_input_cast(self) -> dict:
        with disable_input_dtype_casting(self.unet):
            return self.measure_training(self.lora_step()) | {
                "notes": "cached, without peft's input casts to the fp32 adapters (the trainer's way under autocast)"}

    def variant_cudnn_benchmark(self) -> dict:
        torch.backends.cudnn.benchmark = True
        try:
            return self.measure_training(self.lora_step()) | {"notes": "cached + cudnn.benchmark autotuning"}
        finally:
            torch.backends.cudnn.benchmark = False

    def variant_ckpt(self) -> dict:
        self.unet.enable_gradient_checkpointing()
        try:
            return self.measure_training(self.lora_step()) | {"notes": "cached + gradient checkpointing"}
        finally:
            self.unet.disable_gradient_checkpointing()

    def variant_xformers(self) -> dict:
        if importlib.util.find_spec("xformers") is None:
            return {"skipped": "xformers not installed"}
        processors = self.unet.attn_processors
        self.unet.enable_xformers_memory_efficient_attention()
        try:
            return self.measure_training(self.lora_step()) | {
                "notes": f"cached + xformers {package_version('xformers')}"}
        finally:
            self.unet.set_attn_processor(processors)

    def variant_encode(self) -> dict:
        self.encoders_to(self.device)
        try:
            step = self.lora_step(encoders=(self.vae, self.text_encoder))
            return self.measure_training(step) | {
                "notes": "reference-script way: bf16 VAE encode + text encoder each step (no data loading)"}
        finally:
            self.encoders_to("cpu")

    def variant_fp32(self, tf32: bool) -> dict:
        self.unet.to(dtype=torch.float32)
        set_tf32(tf32)
        try:
            step = self.lora_step(autocast=False)
            steps = self.shape.steps if tf32 else self.shape.slow_steps
            warmup = self.shape.warmup if tf32 else min(2, self.shape.warmup)
            return self.measure_training(step, warmup=warmup, steps=steps) | {
                "notes": f"fp32 base, no autocast, TF32 {'on' if tf32 else 'off'} (matmul + cudnn)"}
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.tf32_defaults
            self.unet.to(dtype=torch.bfloat16)
            cast_training_params(self.unet, dtype=torch.float32)

    def variant_full(self, eight_bit: bool = False) -> dict:
        optimizer_class, optimizer_name = torch.optim.AdamW, "AdamW"
        if eight_bit:
            if self.device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
                return {"skipped": "needs a CUDA GPU and bitsandbytes"}
            import bitsandbytes

            optimizer_class = bitsandbytes.optim.AdamW8bit
            optimizer_name = f"bitsandbytes {package_version('bitsandbytes')} AdamW8bit"
        self.unet.to("cpu")  # Only the fully trained copy on the GPU, so its peak is its own.
        try:
            torch.manual_seed(0)
            with self.device:
                unet = UNet2DConditionModel(**self.shape.unet).train()
            step = TrainStep(unet, list(unet.parameters()), self.batch, self.noise_scheduler, autocast=True, lr=1e-5,
                             optimizer_class=optimizer_class)
            result = self.measure_training(step) | {
                "notes": f"full fine-tuning: fp32 master weights, bf16 autocast, {optimizer_name} on all UNet weights"}
            del step, unet
            return result
        finally:
            reset_memory(self.device)
            self.unet.to(self.device)

    def variant_compile(self) -> dict:
        compiled = torch.compile(self.unet, backend=self.args.compile_backend)
        step = self.lora_step(model=compiled)
        warmup = max(self.shape.warmup, 3)
        result = self.measure_training(step, warmup=warmup)
        result["compile_s"] = round(result["warmup_s"] - warmup * result["median_ms"] / 1e3, 1)
        return result | {"notes": f"cached + torch.compile(unet, backend={self.args.compile_backend!r}); "
                                  f"compile {result['compile_s']} s (warm-up time over {warmup} steps)"}

    # The measures.
    def measure_matmul(self) -> dict:
        n = self.shape.matmul_n
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        _, times = timed_calls(lambda: torch.mm(a, b), 3, 10, self.device)
        median = statistics.median(times)
        self.peak_tflops = 2 * n**3 / median / 1e12
        return {"n": n, "median_ms": round(median * 1e3, 3), "tflops": round(self.peak_tflops, 2),
                "notes": f"bf16 {n}x{n}x{n} matmul, median of 10 after 3 warm-up, random data"}

    def measure_flops(self) -> dict:
        step = self.lora_step()
        step()  # AdamW state and workspaces first, so only one plain step is counted.
        with FlopCounterMode(display=False) as counter:
            step()
        train_flops = counter.get_total_flops()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16):
            timesteps = torch.full((self.args.batch,), 500, device=self.device)
            with FlopCounterMode(display=False) as counter:
                self.unet(self.batch.latents, timesteps, encoder_hidden_states=self.batch.text)
        forward_flops = counter.get_total_flops()
        result = {"train_step_tflop": round(train_flops / 1e12, 3),
                  "forward_tflop_per_image": round(forward_flops / self.args.batch / 1e12, 4),
                  "notes": "FlopCounterMode: matmuls, convolutions, attention (forward + backward of a LoRA step)"}
        median = getattr(self, "cached_median_s", None)
        if median:
            achieved = train_flops / median / 1e12
            result["achieved_tflops"] = round(achieved, 1)
            if getattr(self, "peak_tflops", None):
                result["share_of_matmul_peak"] = round(achieved / self.peak_tflops, 3)
        return result

    def measure_sampling(self) -> dict:
        """Classifier-free guidance at batch 2x4 with DDIM in bf16, as a pipeline with the LoRA loaded runs it."""
        images = self.args.batch // 2
        scheduler = DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        embeddings = self.batch.text[: 2 * images]  # first half unconditional, second conditional (random anyway)
        latent_shape = (images, *self.batch.latents.shape[1:])
        self.vae.to(self.device)
        self.unet.eval()
        result = {"images": images, "guidance_scale": 7.5, "steps": list(self.shape.sampling_steps)}
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16):
                denoise = DenoiseLoop(self.unet, scheduler, embeddings, latent_shape, self.device)
                denoise.steps = 3
                denoise()  # warm-up
                for steps in self.shape.sampling_steps:
                    denoise.steps = steps
                    _, times = timed_calls(denoise, 0, self.shape.sampling_repeats, self.device)
                    median = statistics.median(times)
                    result[f"loop_{steps}_s"] = round(median, 3)
                    result[f"images_per_s_{steps}"] = round(images / median, 2)
                latents = denoise.latents / self.vae.config.scaling_factor
                _, times = timed_calls(lambda: self.vae.decode(latents), 1, self.shape.sampling_repeats, self.device)
                decode = statistics.median(times)
            result["decode_s"] = round(decode, 3)
            for steps in self.shape.sampling_steps:
                result[f"images_per_s_{steps}_with_decode"] = round(images / (result[f"loop_{steps}_s"] + decode), 2)
            result["peak_gib"] = gib(peak_memory(self.device))
            result["notes"] = f"UNet (LoRA attached, unfused) + DDIM, CFG 7.5; VAE decode of the {images} images apart"
            return result
        finally:
            self.unet.train()
            self.vae.to("cpu")

    # Running, recording, reporting.
    def run(self, name: str, fn, *fn_args) -> None:
        elapsed = time.perf_counter() - START
        remaining = self.args.time_budget - elapsed
        if name in self.args.skip:
            record = {"skipped": "--skip"}
        elif self.timed_out or remaining <= 0:
            record = {"skipped": f"time budget of {self.args.time_budget:.0f} s spent ({elapsed:.0f} s elapsed)"}
        else:
            log(f"{name}: start ({remaining:.0f} s of budget left)")
            reset_memory(self.device)
            start = time.perf_counter()
            try:
                with deadline(remaining):
                    record = fn(*fn_args)
            except BudgetExceeded as error:
                self.timed_out = True
                record = {"error": f"{error} (after {time.perf_counter() - start:.0f} s)"}
            except Exception as error:  # noqa: BLE001 - record it and go on to the next variant
                record = {"error": f"{type(error).__name__}: {error}"[:1500]}
                self.timed_out = "BudgetExceeded" in record["error"]
            record["wall_s"] = round(time.perf_counter() - start, 1)
            reset_memory(self.device)
        log(f"{name}: {json.dumps(record)}")
        self.results["runs"][name] = record
        self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - START, 1)
        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, path)


class DenoiseLoop:
    """The reverse loop of a text-to-image pipeline: UNet on [uncond, cond], guidance, scheduler step."""

    def __init__(self, unet, scheduler, embeddings, latent_shape, device, guidance_scale=7.5):
        self.unet, self.scheduler, self.embeddings = unet, scheduler, embeddings
        self.latent_shape, self.device, self.guidance_scale = latent_shape, device, guidance_scale
        self.steps = 25
        self.latents = None

    def __call__(self) -> None:
        self.scheduler.set_timesteps(self.steps, device=self.device)
        latents = torch.randn(self.latent_shape, device=self.device) * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=self.embeddings, return_dict=False)[0]
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + self.guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        self.latents = latents


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        **{name: package_version(name) for name in ("diffusers", "transformers", "peft", "accelerate", "xformers",
                                                         "bitsandbytes")},
        "tf32_default": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpu_memory_gib": gib(props.total_memory),
                "multiprocessors": props.multi_processor_count}
    else:
        env["torch_threads"] = torch.get_num_threads()
    return env


def fmt(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def one_line(text: str) -> str:
    return " ".join(text.replace("|", "/").split())


def markdown_table(results: dict) -> str:
    env, runs = results["env"], results["runs"]
    lines = [f"{env.get('gpu', env['device'])}, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"batch {results['batch']} at {results['resolution']} px, {results['elapsed_s']} s in all", "",
             "| variant | images/s | median step ms | peak memory GiB | notes |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        run = runs.get(name)
        if run is None:
            continue
        note = run.get("skipped") or run.get("error") or run.get("notes", "")
        if run.get("grads_ok") is False:
            note += " (WARNING: some LoRA gradients missing or non-finite)"
        lines.append(f"| {name} | {fmt(run.get('images_per_s'))} | {fmt(run.get('median_ms'))} | "
                     f"{fmt(run.get('peak_gib'), 2)} | {one_line(note)[:300]} |")
    sampling = runs.get("sampling", {})
    for steps in sampling.get("steps", []):
        if f"images_per_s_{steps}" in sampling:
            lines.append(f"| sampling {steps} steps (CFG 2x{sampling['images']}) | {sampling[f'images_per_s_{steps}']} "
                         f"({sampling[f'images_per_s_{steps}_with_decode']} with decode) | "
                         f"{sampling[f'loop_{steps}_s'] * 1e3:.1f} per batch of {sampling['images']} | "
                         f"{fmt(sampling.get('peak_gib'), 2)} | VAE decode {sampling['decode_s'] * 1e3:.1f} ms |")
    if "decode_s" not in sampling and sampling:
        lines.append(f"| sampling | n/a | n/a | n/a | {sampling.get('skipped') or sampling.get('error')} |")
    matmul, flops = runs.get("matmul", {}), runs.get("flops", {})
    lines.append("")
    lines.append(f"bf16 matmul peak: {matmul.get('tflops', matmul.get('skipped') or matmul.get('error'))} TFLOP/s; "
                 f"cached LoRA step: {flops.get('train_step_tflop', 'n/a')} TFLOP counted, "
                 f"{flops.get('achieved_tflops', 'n/a')} TFLOP/s achieved, "
                 f"{fmt(100 * flops['share_of_matmul_peak'] if 'share_of_matmul_peak' in flops else None)}% of the "
                 f"matmul peak; UNet forward {flops.get('forward_tflop_per_image', 'n/a')} TFLOP per image")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_gpu.json", help="JSON results, rewritten after each variant")
    parser.add_argument("--tiny", action="store_true", help="tiny widths at 64 px: checks every path in seconds")
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu (with --tiny only)")
    parser.add_argument("--batch", type=int, default=8, help="training batch; sampling runs batch/2 images")
    parser.add_argument("--skip", nargs="*", default=[], choices=VARIANTS + MEASURES, metavar="NAME",
                        help=f"variants or measures to leave out: {', '.join(VARIANTS + MEASURES)}")
    parser.add_argument("--time-budget", type=float, default=330.0,
                        help="seconds from start; later variants are skipped and a running one is stopped")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager to test)")
    args = parser.parse_args()
    if args.batch < 2 or args.batch % 2:
        parser.error(f"--batch must be even and at least 2 (sampling runs batch/2 images), got {args.batch}")

    if args.device == "auto" and not torch.cuda.is_available() and not args.tiny:
        parser.error("no CUDA device: the SD-1.5 shape needs a GPU; use --tiny on the CPU, or --device cpu to insist")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    shape = TINY if args.tiny else SD15
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # The tiny run checks code paths, not speed; do not fight neighbours for cores.
    bench = Bench(args, shape, device)
    bench.results = {"env": environment(device), "batch": args.batch, "resolution": shape.resolution,
                     "tiny": args.tiny, "time_budget_s": args.time_budget, "runs": {}}
    log(f"environment: {json.dumps(bench.results['env'])}")
    bench.save()

    bench.build()
    bench.make_batch()
    bench.encoders_to("cpu")
    bench.save()

    bench.run("matmul", bench.measure_matmul)
    bench.run("cached", bench.variant_cached)
    bench.run("flops", bench.measure_flops)
    bench.run("no-input-cast", bench.variant_no_input_cast)
    bench.run("cudnn-benchmark", bench.variant_cudnn_benchmark)
    bench.run("ckpt", bench.variant_ckpt)
    bench.run("xformers", bench.variant_xformers)
    bench.run("encode", bench.variant_encode)
    bench.run("fp32-tf32", bench.variant_fp32, True)
    bench.run("fp32", bench.variant_fp32, False)
    bench.run("sampling", bench.measure_sampling)
    bench.run("full", bench.variant_full)
    bench.run("full-8bit", bench.variant_full, True)
    bench.run("compile", bench.variant_compile)

    bench.save()
    print("\n" + markdown_table(bench.results), flush=True)
    if bench.timed_out:  # A stopped compile can leave worker processes behind; do not wait on them.
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
