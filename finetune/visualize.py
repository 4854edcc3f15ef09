"""Pictures of the diffusion process, drawn the way the DDPM chapter draws it: annotated strips and GIFs.

    python -m finetune.visualize outputs/shapes
    python -m finetune.visualize outputs/shapes --prompt "a blue triangle" --timesteps 50 100 250 500 999
    python -m finetune.visualize outputs/shapes-lora --image my.png --num-inference-steps 100 --output-dir figures
    python -m finetune.visualize outputs/shapes/checkpoint-1000      # a checkpoint: exported first (finetune.export)

writes `forward.png`, `forward.gif`, `reverse.png` and `reverse.gif` (default: into `<folder>/samples/process/`; for a
checkpoint, the folder is its export, `checkpoint-N/pipeline`).

- Forward process q(x_t | x_0) on one training image: x_0, then x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
  (Ho et al. 2020, eq. 4; the scheduler's `add_noise`) at the chosen timesteps, all with the same eps drawn from the
  seed, and eps itself ("pure noise"). The image is the first sample of the run's training data (the built-in set
  for a folder without config.yaml), or `--image`, centre-cropped and resized as training does.
- Reverse process for a prompt: top row x_t from pure noise x_T to the final image, bottom row the model's
  predicted x_0 at each shown step (the `pred_original_sample` the scheduler derives from x_t and the model's
  output); the final image is the pipeline's own output for the same seed and settings. An SDXL model's run goes
  through diffusers' own pipeline with its own sampler (Euler for SDXL base): its x_t are shown as the UNet takes
  them, in DDPM's scaling (Euler's own samples are x_0 + sigma_t eps), and its forward process is training's, this
  project's DDPMScheduler with the model's schedule.

Latent-space models (a pipeline with a VAE): the forward process runs on the image's latent (the mean of the VAE's
posterior, times its scaling factor, as training scales it) and every x_t and predicted x_0 is decoded by the VAE
for display; the titles say so. A decoded noisy latent does not look like pixel noise: that is what a latent
model's x_t are. The strip then starts with the input image, before x_0 (its latent, decoded).

The functions (`forward_strip`, `reverse_strip`, `save_gif`, and `forward_frames` / `reverse_frames` for the
tensors) take a scheduler or a pipeline and plain values, so training can log the strips at validation time.
Pixels map from [-1, 1] to [0, 255] as the pipeline maps its output (values outside are clipped); images smaller
than `cell_size` are enlarged by a whole factor with nearest-neighbour resampling, so each pixel stays a square.
"""

import argparse
import contextlib
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw, ImageFont

from pipelines import DDPMScheduler, TextToImageDDPMPipeline

from .cli import ToolParser, UserError, run
from .config import ValidationConfig, load_config
from .data import build_source, pick_caption
from .data import shapes as builtin_shapes
from .data.transforms import decode_rgb, to_tensor, to_unit_range
from .results import hide_library_progress, load_result, result_folder, run_guidance_scale

BACKGROUND, EMPTY_CELL, INK = (255, 255, 255), (225, 225, 225), (0, 0, 0)
PAD = 4
DECODE_BATCH = 4  # latents decoded at once (a 512 px VAE decode is memory-hungry)


@dataclass
class Frame:
    """One picture of the process: its label (lines joined by newlines), the sample in the model's space
    ((C, h, w), float32 on the CPU: pixels in [-1, 1], or a latent) and what is shown (None: nothing)."""

    label: str
    sample: torch.Tensor | None
    image: Image.Image | None


@dataclass
class ReverseProcess:
    """The reverse chain at the steps kept: step 0 is x_T, step `num_inference_steps` the final x_0."""

    steps: list[int]
    timesteps: list[int]  # the timestep of each x_t kept (the final x_0: -1)
    noisy: list[Frame]  # x_t at each kept step
    predicted: list[Frame]  # the predicted x_0 made from that x_t (none from the final x_0)
    image: Image.Image  # the pipeline's output


def default_timesteps(num_train_timesteps: int, count: int = 5) -> list[int]:
    """`count` timesteps evenly spaced over (0, T), the last T - 1: 200, 400, 600, 800, 999 for T = 1000."""
    T = num_train_timesteps
    return sorted({min(T - 1, max(1, round(T * k / count))) for k in range(1, count + 1)})


def spaced(last: int, count: int) -> list[int]:
    """`count` (or fewer, when there are fewer) evenly spaced integers from 0 to `last`, both ends included."""
    return sorted({round(v) for v in np.linspace(0, last, max(1, min(count, last + 1)))})


def to_pixels(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A (3, H, W) float32 tensor in [-1, 1]: a float tensor already in that range, the uint8 pixels the data stream
    gives (scaled as training scales them), or an RGB image scaled the same way."""
    if isinstance(image, torch.Tensor):
        image = to_unit_range(image) if image.dtype == torch.uint8 else image
        return image.detach().float().cpu().reshape(-1, *image.shape[-2:])
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def to_images(samples: torch.Tensor, vae=None) -> list[Image.Image]:
    """Display images of samples (N, C, h, w) in the model's space: decoded by the VAE first for latents, then
    mapped from [-1, 1] to 8 bits the way the pipeline maps its output."""
    if vae is not None:
        chunks = samples.split(DECODE_BATCH)
        samples = torch.cat([vae.decode((c / vae.config.scaling_factor).to(vae.device, vae.dtype),
                                        return_dict=False)[0].float().cpu() for c in chunks])
    return VaeImageProcessor(do_normalize=True).postprocess(samples.float(), output_type="pil")


@torch.no_grad()
def forward_frames(scheduler, image: Image.Image | torch.Tensor, timesteps: list[int], seed: int = 0,
                   vae=None) -> list[Frame]:
    """The forward process on `image`: x_0, x_t at each of `timesteps` (one eps, drawn from `seed`, for all), and
    eps. `scheduler` is a DDPM-style one (`add_noise` gives sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps);
    with a `vae` the process runs on the image's latent and an "image" frame comes first."""
    T = scheduler.config.num_train_timesteps
    if not timesteps or any(not 0 <= t < T for t in timesteps):
        raise ValueError(f"timesteps must be between 0 and {T - 1} (the model's T - 1), got {timesteps}")
    pixels = to_pixels(image)[None]
    x0 = pixels
    if vae is not None:  # the latent as training scales it; the posterior's mean, so the picture is reproducible
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        x0 = posterior.mode().float().cpu() * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(timesteps, dtype=torch.long)
    noisy = scheduler.add_noise(x0.expand(len(t), -1, -1, -1), noise.expand(len(t), -1, -1, -1), t)
    samples = torch.cat([x0, noisy, noise])
    labels = ["x_0" if vae is None else "x_0 (latent)", *(f"t={int(v)}" for v in timesteps), "pure noise"]
    frames = [Frame(label, s, im) for label, s, im in zip(labels, samples, to_images(samples, vae))]
    if vae is not None:
        frames.insert(0, Frame("image", pixels[0], to_images(pixels)[0]))
    return frames


@torch.no_grad()
def reverse_frames(pipeline: TextToImageDDPMPipeline, prompt: str, num_inference_steps: int = 50,
                   guidance_scale: float = 1.0, seed: int = 0, negative_prompt: str | None = None,
                   steps: list[int] | None = None) -> ReverseProcess:
    """Sample `prompt` once (CPU generator seeded `seed`, as `pipeline(..., generator=...)` would) and keep the
    x_t and predicted x_0 at `steps` (indices into the chain 0..num_inference_steps; default all). Only the kept
    ones are decoded. The last frame's image is the pipeline's output itself. This project's pipeline or a
    diffusers one (SDXL's: `stock_trajectory`)."""
    call = dict(negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed), output_type="pil")
    if isinstance(pipeline, TextToImageDDPMPipeline):
        out = pipeline(prompt, **call, return_trajectory=True)
    else:
        out = stock_trajectory(pipeline, prompt, **call)
    last = num_inference_steps
    steps = sorted(set(range(last + 1) if steps is None else steps))
    if any(not 0 <= s <= last for s in steps):
        raise ValueError(f"steps must be between 0 and num_inference_steps={last}, got {steps}")
    timesteps = [*out.timesteps, -1]
    vae = getattr(pipeline, "vae", None)

    inner = [s for s in steps if s < last]  # the final x_0 is the pipeline's output image
    noisy_samples = torch.cat([out.trajectory[s].float().cpu() for s in steps])
    noisy_images = to_images(noisy_samples[:len(inner)], vae) if inner else []
    predictions = [out.pred_original_samples[s] for s in inner]
    have_predictions = bool(inner) and all(p is not None for p in predictions)  # (DPM-Solver gives none)
    pred_samples = torch.cat([p.float().cpu() for p in predictions]) if have_predictions else None
    pred_images = to_images(pred_samples, vae) if have_predictions else [None] * len(inner)

    noisy, predicted = [], []
    for i, s in enumerate(inner):
        name = "x_T (pure noise)" if s == 0 else "x_t"
        noisy.append(Frame(f"{name}\nt={timesteps[s]}", noisy_samples[i], noisy_images[i]))
        sample = pred_samples[i] if have_predictions else None
        predicted.append(Frame(f"predicted x_0\nfrom t={timesteps[s]}", sample, pred_images[i]))
    if steps[-1] == last:
        noisy.append(Frame("x_0\nfinal image", noisy_samples[-1], out.images[0]))
        predicted.append(Frame("predicted x_0\n(none: done)", None, None))
    return ReverseProcess(steps=steps, timesteps=[timesteps[s] for s in steps], noisy=noisy, predicted=predicted,
                          image=out.images[0])


def stock_trajectory(pipeline, prompt: str, **call) -> SimpleNamespace:
    """`pipeline(prompt, **call)` for a diffusers pipeline (SDXL's), with what this project's pipeline returns with
    `return_trajectory=True`: `trajectory`, x_t before each step and the final x_0, and `pred_original_samples`, the
    scheduler's predicted x_0 at each step (None where it gives none), of the first image; `timesteps`; `images`.
    The x_t are the UNet's inputs (`scale_model_input`'s), so in DDPM's scaling, sqrt(alpha_bar_t) x_0 +
    sqrt(1 - alpha_bar_t) eps, also under a sigma-scaled sampler such as SDXL's Euler (its own samples are
    x_0 + sigma_t eps). The scheduler is itself again afterwards."""
    scheduler = pipeline.scheduler
    if getattr(scheduler, "order", 1) != 1:
        raise UserError(f"{type(scheduler).__name__} calls the model {scheduler.order} times a step; the "
                        "reverse-process strips need a scheduler with one call a step (Euler, DDPM, DDIM, DPM-Solver, "
                        "...)")
    trajectory, predictions, final = [], [], []
    scale, step = scheduler.scale_model_input, scheduler.step

    def recorded_scale(sample, *args, **kwargs):
        scaled = scale(sample, *args, **kwargs)
        trajectory.append(scaled[:1])  # (with guidance the batch is the same x_t twice)
        return scaled

    def recorded_step(*args, return_dict: bool = True, **kwargs):
        out = step(*args, return_dict=True, **kwargs)
        predicted = getattr(out, "pred_original_sample", None)
        predictions.append(None if predicted is None else predicted[:1])
        final[:] = [out.prev_sample[:1]]
        return out if return_dict else out.to_tuple()

    with _instead(scheduler, scale_model_input=recorded_scale, step=recorded_step):
        images = pipeline(prompt, **call).images
    steps = call["num_inference_steps"]
    if len(trajectory) != steps or len(predictions) != steps:  # (a pipeline that steps otherwise)
        raise ValueError(f"{type(pipeline).__name__} called the model {len(trajectory)} times in {steps} steps")
    return SimpleNamespace(images=images, trajectory=[*trajectory, *final], pred_original_samples=predictions,
                           timesteps=[int(round(float(t))) for t in scheduler.timesteps])


@contextlib.contextmanager
def _instead(obj, **methods):
    """`obj`'s methods replaced by `methods` on the instance for the duration, then as they were (the class's, or
    what the instance itself held)."""
    held = {name: vars(obj)[name] for name in methods if name in vars(obj)}
    for name, method in methods.items():
        setattr(obj, name, method)
    try:
        yield
    finally:
        for name in methods:
            vars(obj).pop(name, None)
        vars(obj).update(held)


def forward_scheduler(pipeline):
    """The forward process's scheduler: the pipeline's own for this project's pipeline; for a diffusers one
    (SDXL's Euler adds noise at its sampling sigmas, not at training timesteps) this project's DDPMScheduler with
    the model's schedule, which is how training noised the images."""
    if isinstance(pipeline, TextToImageDDPMPipeline):
        return pipeline.scheduler
    return DDPMScheduler.from_config(pipeline.scheduler.config)


def render_strip(rows: list[list[Frame]], title: str | None = None, cell_size: int = 128) -> Image.Image:
    """Draw rows of frames as one image: each picture under its label, enlarged (nearest neighbour, by a whole
    factor) to at least `cell_size` pixels, with an optional title wrapped above. The picture boxes are kept in
    `image.info["cell_boxes"]` (rows of (left, top, right, bottom)) and the title in `image.info["title"]`."""
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag_")[3] + 3
    native = next(f.image for row in rows for f in row if f.image is not None)
    factor = max(1, math.ceil(cell_size / native.width))
    cell_w, cell_h = native.width * factor, native.height * factor
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    column_w = max([cell_w] + [measure.textlength(line, font=font) + 2 for row in rows for f in row
                               for line in f.label.split("\n")])
    column_w = math.ceil(column_w)
    width = PAD + max(len(row) for row in rows) * (column_w + PAD)
    title_lines = _wrap(title, width - 2 * PAD, measure, font) if title else []
    label_lines = [max(len(f.label.split("\n")) for f in row) for row in rows]
    height = PAD + len(title_lines) * line_height + sum(n * line_height + cell_h + 2 * PAD for n in label_lines)

    strip = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    y = PAD
    for line in title_lines:
        draw.text((PAD, y), line, fill=INK, font=font)
        y += line_height
    boxes = []
    for row, lines in zip(rows, label_lines):
        row_boxes = []
        for j, frame in enumerate(row):
            left = PAD + j * (column_w + PAD)
            for k, line in enumerate(frame.label.split("\n")):
                x = left + (column_w - measure.textlength(line, font=font)) / 2
                draw.text((x, y + PAD + k * line_height), line, fill=INK, font=font)
            box_left, top = left + (column_w - cell_w) // 2, y + PAD + lines * line_height
            box = (box_left, top, box_left + cell_w, top + cell_h)
            if frame.image is None:
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=EMPTY_CELL)
            else:
                strip.paste(frame.image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST), box[:2])
            row_boxes.append(box)
        boxes.append(row_boxes)
        y += lines * line_height + cell_h + 2 * PAD
    strip.info["cell_boxes"], strip.info["title"] = boxes, title
    return strip


def _wrap(text: str, width: float, measure: ImageDraw.ImageDraw, font) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than the width gets a line of its own)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and measure.textlength(candidate, font=font) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + ([line] if line else [])


def forward_strip(scheduler, image: Image.Image | torch.Tensor, timesteps: list[int] | None = None, seed: int = 0,
                  vae=None, cell_size: int = 128,
                  gif_timesteps: list[int] | None = None) -> tuple[Image.Image, list[Image.Image]]:
    """The forward process as one annotated strip, and GIF frames (one per picture: x_0, x_t at `gif_timesteps`,
    default the strip's, then pure noise). `timesteps` default: `default_timesteps(T)`."""
    T = scheduler.config.num_train_timesteps
    timesteps = timesteps or default_timesteps(T)
    frames = forward_frames(scheduler, image, timesteps, seed, vae)
    space = "VAE latents, decoded for display" if vae is not None else "pixel space"
    title = (f"Forward process q(x_t | x_0): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, one eps "
             f"(seed {seed}); T={T}, {_schedule(scheduler)}; {space}")
    strip = render_strip([frames], title, cell_size)
    if gif_timesteps is not None and list(gif_timesteps) != list(timesteps):
        frames = forward_frames(scheduler, image, gif_timesteps, seed, vae)
    return strip, [render_strip([[frame]], cell_size=cell_size) for frame in frames]


def reverse_strip(pipeline: TextToImageDDPMPipeline, prompt: str, num_inference_steps: int = 50,
                  guidance_scale: float = 1.0, seed: int = 0, num_shown: int = 6, negative_prompt: str | None = None,
                  cell_size: int = 128, num_gif_frames: int | None = None) -> tuple[Image.Image, list[Image.Image]]:
    """The reverse process for `prompt` as one annotated strip (top: x_t at `num_shown` evenly spaced steps from
    pure noise to the final image; bottom: the predicted x_0 at each), and GIF frames ([x_t | predicted x_0] at
    every step, or at `num_gif_frames` evenly spaced ones: a latent model decodes each)."""
    shown = spaced(num_inference_steps, num_shown)
    animated = spaced(num_inference_steps, num_gif_frames or num_inference_steps + 1)
    process = reverse_frames(pipeline, prompt, num_inference_steps, guidance_scale, seed, negative_prompt,
                             steps=sorted(set(shown) | set(animated)))
    at = {s: i for i, s in enumerate(process.steps)}
    space = "; VAE latents, decoded for display" if getattr(pipeline, "vae", None) is not None else ""
    title = (f'Reverse process for "{prompt}": {num_inference_steps} {type(pipeline.scheduler).__name__} steps from '
             f"pure noise, guidance {guidance_scale:g}, seed {seed}; bottom row: the predicted x_0 at each step{space}")
    strip = render_strip([[process.noisy[at[s]] for s in shown], [process.predicted[at[s]] for s in shown]], title,
                         cell_size)
    frames = [render_strip([[process.noisy[at[s]], process.predicted[at[s]]]], cell_size=cell_size)
              for s in animated]
    return strip, frames


def save_gif(frames: list[Image.Image], path: str | Path, duration_ms: int = 150, hold_last_ms: int = 1500) -> Path:
    """An endlessly looping GIF, each frame shown `duration_ms` and the last `hold_last_ms`; frames of different
    sizes are placed top-left on a white canvas of the largest."""
    width, height = max(f.width for f in frames), max(f.height for f in frames)
    canvases = []
    for frame in frames:
        canvas = Image.new("RGB", (width, height), BACKGROUND)
        canvas.paste(frame.convert("RGB"), (0, 0))
        canvases.append(canvas)
    durations = [duration_ms] * (len(canvases) - 1) + [hold_last_ms]
    canvases[0].save(path, save_all=True, append_images=canvases[1:], duration=durations, loop=0)
    return Path(path)


def _schedule(scheduler) -> str:
    config = scheduler.config
    return f"{config.beta_schedule} betas" + (", zero terminal SNR" if config.get("rescale_betas_zero_snr") else "")


def training_image(folder: str | Path, resolution: int) -> tuple[torch.Tensor, str]:
    """The first sample of the run's training data (its config.yaml; the built-in set without one) and its
    caption, centre-cropped and resized to `resolution` by training's own transform (no flip)."""
    path = Path(folder) / "config.yaml"
    data = load_config(path).data if path.is_file() else load_config(None).data
    if data.source == "builtin" and not data.sources:  # sample 0 of the set, rendered directly: nothing to write
        png, caption, _ = builtin_shapes.render_sample(0, 0, tuple(data.colors or builtin_shapes.DEFAULT_COLORS))
    else:
        source = build_source(data, seed=0)
        raw = next(s for s in source.samples(random.Random(0), 0, 1, Counter()) if s.image is not None)
        section = source.configs[raw.dataset] if data.sources else data  # (its dataset's default caption)
        png, caption = raw.image, pick_caption(raw.caption, random.Random(0)) or section.default_caption or ""
    image = decode_rgb(png, data.max_image_pixels)
    return to_tensor(image, resolution, center_crop=True, random_flip=False, rng=random.Random(0)), caption


def pixel_size(pipeline: TextToImageDDPMPipeline) -> int:
    """The images' side in pixels: the UNet's sample size, times the VAE's factor for a latent model."""
    size = pipeline.unet.config.sample_size
    return (size if isinstance(size, int) else size[0]) * pipeline.vae_scale_factor


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = ToolParser(prog="python -m finetune.visualize", description=__doc__)
    parser.add_argument("folder", help="a run's output folder (a pipeline, or a LoRA output), one of its checkpoint-N "
                                       "folders, or any pipeline folder")
    parser.add_argument("--prompt", help="prompt for the reverse process (default: the run's first validation prompt)")
    parser.add_argument("--negative-prompt", help="what guidance steers away from (default: the empty caption)")
    parser.add_argument("--image", help="image for the forward process (default: the run's first training sample)")
    parser.add_argument("--timesteps", type=int, nargs="+",
                        help="forward-process timesteps to show (default: 5 evenly spaced, the last T - 1)")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="reverse-process steps")
    parser.add_argument("--num-shown", type=int, default=6, help="reverse-process steps shown in the strip")
    parser.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance; default: the run's validation.guidance_scale (else 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the forward process's noise and of the sample")
    parser.add_argument("--cell-size", type=int, default=128, help="enlarge smaller images to at least this")
    parser.add_argument("--device", help="torch device to sample on (default: cuda when there is one, else cpu)")
    parser.add_argument("--output-dir", help="where to write (default: FOLDER/samples/process)")
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    parser, args = parse_args(argv)
    hide_library_progress()
    if args.num_shown < 2 or args.cell_size < 1:
        parser.error(f"--num-shown must be >= 2 and --cell-size >= 1, got {args.num_shown} and {args.cell_size}")
    args.folder = str(result_folder(args.folder))  # a checkpoint: its export
    try:
        pipeline = load_result(args.folder)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load {args.folder}: {error}") from error
    pipeline.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline.set_progress_bar_config(disable=True)
    T = pipeline.scheduler.config.num_train_timesteps
    timesteps = args.timesteps or default_timesteps(T)
    if any(not 0 <= t < T for t in timesteps):
        parser.error(f"--timesteps must be between 0 and {T - 1} (the model's T - 1), got {timesteps}")
    if not 1 <= args.num_inference_steps <= T:
        parser.error(f"--num-inference-steps must be between 1 and {T}, got {args.num_inference_steps}")
    config_path = Path(args.folder) / "config.yaml"
    prompts = load_config(config_path).validation.texts if config_path.is_file() else ValidationConfig().texts
    prompt = args.prompt or prompts[0]
    guidance = run_guidance_scale(args.folder) if args.guidance_scale is None else args.guidance_scale
    if args.image:
        try:
            image = to_tensor(decode_rgb(Path(args.image).read_bytes()), pixel_size(pipeline), True, False,
                              random.Random(0))
        except (OSError, ValueError) as error:
            raise UserError(f"--image {args.image}: {error}; give a readable image file") from error
        caption = Path(args.image).name
    else:
        try:
            image, caption = training_image(args.folder, pixel_size(pipeline))
        except (OSError, ValueError, StopIteration) as error:
            raise UserError(f"could not read the run's first training sample ({error!r}); give an image with "
                            "--image") from error

    out = Path(args.output_dir) if args.output_dir else Path(args.folder) / "samples" / "process"
    out.mkdir(parents=True, exist_ok=True)
    strip, frames = forward_strip(forward_scheduler(pipeline), image, timesteps, args.seed, pipeline.vae,
                                  args.cell_size, gif_timesteps=default_timesteps(T, 20))
    strip.save(out / "forward.png")
    save_gif(frames, out / "forward.gif", duration_ms=250)
    strip, frames = reverse_strip(pipeline, prompt, args.num_inference_steps, guidance, args.seed, args.num_shown,
                                  args.negative_prompt, args.cell_size)
    strip.save(out / "reverse.png")
    save_gif(frames, out / "reverse.gif")
    print(f"forward process of {caption!r} and reverse process for {prompt!r} ({args.num_inference_steps} steps, "
          f"guidance {guidance:g}, seed {args.seed}): forward.png, forward.gif, reverse.png, reverse.gif in {out}")
    return out


if __name__ == "__main__":
    run(main)
