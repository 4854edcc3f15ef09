"""Sample grids during training: one row per prompt, saved as PNG and logged to tensorboard."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines import TextToImageDDPMPipeline

from .config import ValidationConfig


def make_grid(images: list[Image.Image], columns: int, pad: int = 2) -> Image.Image:
    """Tile equally sized images into rows of `columns`, on a white background."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad), "white")
    for i, image in enumerate(images):
        grid.paste(image, (pad + (i % columns) * (width + pad), pad + (i // columns) * (height + pad)))
    return grid


def sample_grid(pipeline: TextToImageDDPMPipeline, config: ValidationConfig) -> Image.Image:
    """Draw `num_images_per_prompt` images for every prompt with a fixed seed and tile them."""
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    images = pipeline(
        config.prompts,
        num_images_per_prompt=config.num_images_per_prompt,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        generator=generator,
        output_type="pil",
    ).images
    return make_grid(images, columns=config.num_images_per_prompt)


def log_validation(pipeline: TextToImageDDPMPipeline, config: ValidationConfig, step: int, output_dir: str,
                   trackers: list) -> Path:
    """Sample a grid, save it to `output_dir/samples/step-<step>.png` and hand it to the trackers."""
    pipeline.set_progress_bar_config(disable=True)
    grid = sample_grid(pipeline, config)
    path = Path(output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return path
