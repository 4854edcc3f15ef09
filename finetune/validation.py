"""What validation draws during training: sample grids (one row per prompt) and pictures of the diffusion process
(the forward process on a training image, the reverse process for the first prompt), saved as PNG under
output_dir/samples/ and logged to the trackers."""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines import TextToImageDDPMPipeline

from . import conditioning, heldout, metrics, visualize
from .config import DataConfig, ValidationConfig, held_out_section

logger = logging.getLogger(__name__)

BASE_GRID = "base.png"  # a fine-tune's base, drawn with the validation settings before the first step


def make_grid(images: list[Image.Image], columns: int, pad: int = 2) -> Image.Image:
    """Tile equally sized images into rows of `columns`, on a white background."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad), "white")
    for i, image in enumerate(images):
        grid.paste(image, (pad + (i % columns) * (width + pad), pad + (i // columns) * (height + pad)))
    return grid


def sample_grid(pipeline: TextToImageDDPMPipeline, config: ValidationConfig, gaps: dict | None = None) -> Image.Image:
    """Draw `num_images_per_prompt` images for every prompt with a fixed seed and tile them: all prompts in one call,
    or, when a prompt has settings of its own (`validation.prompts` entries with a seed, guidance or negative
    prompt), one call per prompt with its settings. Given `gaps`, fill it with how far the prompts move the
    predictions along the way (`conditioning.prompt_gaps`; this project's pipeline only, not the stock SD ones)."""
    ours = isinstance(pipeline, TextToImageDDPMPipeline)
    calls = [row.__dict__ for row in config.rows()] if config.per_prompt else [
        {"prompt": config.texts, "negative_prompt": None, "seed": config.seed, "guidance_scale": config.guidance_scale}]
    outputs = [pipeline(
        call["prompt"],
        **({"negative_prompt": call["negative_prompt"]} if call["negative_prompt"] else {}),
        num_images_per_prompt=config.num_images_per_prompt,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=call["guidance_scale"],
        generator=torch.Generator(device="cpu").manual_seed(call["seed"]),
        output_type="pil",
        **({"return_trajectory": gaps is not None} if ours else {}),
    ) for call in calls]
    if gaps is not None and ours:  # the rows' trajectories side by side, as one call over all prompts gives them
        trajectory = [torch.cat(steps) for steps in zip(*(output.trajectory for output in outputs))]
        gaps.update(conditioning.prompt_gaps(pipeline, config.texts, trajectory, outputs[0].timesteps))
    return make_grid([image for output in outputs for image in output.images], columns=config.num_images_per_prompt)


def log_validation(pipeline: TextToImageDDPMPipeline, config: ValidationConfig, step: int, output_dir: str,
                   trackers: list) -> Path:
    """Sample a grid, save it to `output_dir/samples/step-<step>.png` and hand it to the trackers (beside the base's
    grid, `samples/base.png`, when the run drew one: `validation/vs_base`); with
    `validation.process_strips`, the same for the reverse process (and, once, the forward process) under
    `output_dir/samples/process/`. Returns the grid's path."""
    pipeline.set_progress_bar_config(disable=True)
    gaps = {}
    grid = sample_grid(pipeline, config, gaps)
    path = Path(output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    log_image(trackers, "validation", grid, step)
    base = path.parent / BASE_GRID
    if base.is_file():  # the base's grid on the left, this step's on the right (the same settings: the same size)
        with Image.open(base) as image:
            if image.size == grid.size:
                log_image(trackers, "validation/vs_base", make_grid([image.convert("RGB"), grid], 2, pad=8), step)
    log_scalars(trackers, gaps, step)
    if gaps:
        logger.info("step %d: %s", step, conditioning.describe(gaps))
    if config.process_strips:
        try:  # pictures for people: a failure here (say, an unreadable first training image) must not end the run
            log_process(pipeline, config, step, Path(output_dir) / "samples" / "process", trackers)
        except Exception as error:  # noqa: BLE001
            logger.warning("step %d: the diffusion-process strips were not drawn (%s: %s)", step,
                           type(error).__name__, error)
    return path


_held_out: dict[str, list[dict]] = {}  # the pairs of each held-out data, read once per run


def log_held_out_loss(pipeline: TextToImageDDPMPipeline, data: DataConfig, config: ValidationConfig, step: int,
                      trackers: list, batch_size: int = 32) -> float | None:
    """With `validation.loss_samples`, the validation loss on that many held-out pairs (the built-in set's new
    renderings, or `validation.loss_data` over the run's data section), at 10 fixed timesteps with fixed noise, as
    `python -m finetune.evaluate` measures it, `batch_size` pairs at a time: logged as `validation_loss` and
    `validation_loss_t<t>`, and returned. This project's pipelines and SDXL's (conditioned as training conditions
    them). A failure is a warning: it must not end the run."""
    if not config.loss_samples:
        return None
    try:
        held_out = heldout.read_in_order(held_out_section(data, config.loss_data))
        key = json.dumps([dataclasses.asdict(held_out), config.loss_samples], sort_keys=True, default=str)
        if key not in _held_out:
            source = heldout.held_out_source(held_out, config.loss_samples)
            _held_out[key] = heldout.held_out_pairs(source, held_out, config.loss_samples)[0]
        timesteps = metrics.loss_timesteps(pipeline.scheduler.config.num_train_timesteps)
        report = heldout.validation_loss(pipeline, _held_out[key], timesteps, batch_size=batch_size)
    except Exception as error:  # noqa: BLE001 - a measurement for people: it must not end the run
        logger.warning("step %d: the validation loss was not measured (%s: %s)", step, type(error).__name__, error)
        return None
    log_scalars(trackers, {"validation_loss": report["mean"],
                           **{f"validation_loss_t{t}": v for t, v in report["per_timestep"].items()}}, step)
    logger.info("step %d: validation loss %.5f over %d held-out pairs", step, report["mean"], report["num_samples"])
    return report["mean"]


def log_process(pipeline: TextToImageDDPMPipeline, config: ValidationConfig, step: int, folder: Path,
                trackers: list) -> None:
    """The reverse process for the first validation prompt at this step (`reverse-step-<step>.png`: x_t and the
    predicted x_0 at 6 steps), and the forward process on the run's first training image (`forward.png`; it
    does not change as the model trains, so it is drawn once)."""
    folder.mkdir(parents=True, exist_ok=True)
    first = config.rows()[0]
    reverse, _ = visualize.reverse_strip(pipeline, first.prompt, config.num_inference_steps, first.guidance_scale,
                                         first.seed, num_gif_frames=2, negative_prompt=first.negative_prompt)
    reverse.save(folder / f"reverse-step-{step}.png")
    log_image(trackers, "process/reverse", reverse, step)
    if not (folder / "forward.png").is_file():
        image, _ = visualize.training_image(folder.parent.parent, visualize.pixel_size(pipeline))
        forward, _ = visualize.forward_strip(visualize.forward_scheduler(pipeline), image,
                                             vae=getattr(pipeline, "vae", None))
        forward.save(folder / "forward.png")
        log_image(trackers, "process/forward", forward, step)


def log_scalars(trackers: list, values: dict, step: int) -> None:
    """Hand scalars to every tracker (a tracker that fails is a warning)."""
    for tracker in trackers:
        try:
            tracker.log(values, step=step)
        except Exception as error:  # noqa: BLE001 - a tracker's hiccup must not end a run
            logger.warning("could not log %s to %s: %s", ", ".join(values), tracker.name, error)


def log_image(trackers: list, name: str, image: Image.Image, step: int) -> None:
    """Hand one picture to the trackers that take pictures: tensorboard, and wandb / swanlab through accelerate's
    `log_images` (a list of images each); the others get none. A tracker that fails is a warning."""
    array = np.asarray(image.convert("RGB"))
    for tracker in trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, array, step, dataformats="HWC")
            elif tracker.name in ("wandb", "swanlab"):
                tracker.log_images({name: [array]}, step=step)
        except Exception as error:  # noqa: BLE001 - a tracker's hiccup must not end a run
            logger.warning("could not log %s to %s: %s", name, tracker.name, error)
