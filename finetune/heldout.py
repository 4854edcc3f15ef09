"""Held-out image-text pairs and the validation loss on them: what `python -m finetune.evaluate --metrics loss`
and the trainer's `validation.loss_samples` (finetune/validation.py) measure a model on. The pairs are read in a
fixed order through the run's filters and transforms, centre-cropped; the loss is the training objective at fixed
timesteps with fixed noise, so the same model and data give the same number and checkpoints compare."""

import dataclasses
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines import DDPMScheduler

from . import metrics
from .config import DataConfig, load_config
from .data import build_source, entries, failed_filter, pick_caption
from .data.shapes import DEFAULT_COLORS, render_sample
from .data.tables import RawSample
from .data.transforms import crop_square, decode_rgb, to_unit_range, unreadable_reason
from .families import TwoEncodersXL, tokenize

HELDOUT_SEED = 1  # the built-in set's held-out renderings; training renders seed 0


# ---- held-out data -----------------------------------------------------------------------------


class HeldOutShapes:
    """Held-out pairs of the built-in set: its generator with seed `HELDOUT_SEED` where training used seed 0, so
    each image is a new rendering (position, size, shade, background, watermark) while every colour, shape and
    caption template also occurs in training. Keys `heldout-s1-<index>` never name a training sample."""

    def __init__(self, num_samples: int, colors: tuple[str, ...]):
        self.num_samples, self.colors = num_samples, colors

    def samples(self, order_rng: random.Random, part: int, parts: int, counts: Counter):
        for index in range(part, self.num_samples, parts):
            png, caption, metadata = render_sample(index, HELDOUT_SEED, self.colors)
            yield RawSample(key=f"heldout-s{HELDOUT_SEED}-{index:06d}", image=png, caption=caption, metadata=metadata)


def held_out_data(folder: str, overrides: list[str], resolution: int) -> tuple[DataConfig, DataConfig]:
    """The run's data section (from its config.yaml; without one, the defaults at the pipeline's `resolution`) and
    the held-out data: that section with the `data.key=value` overrides applied, read deterministically (centre
    crop, no flip, no caption dropout, no shuffle buffer, no cache, no workers, one pass even where the run
    resampled its shards)."""
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ValueError(f"--data {' '.join(bad)}: only data-section overrides (data.key=value) name held-out data")
    path = Path(folder) / "config.yaml"
    config, defaults = (path, []) if path.is_file() else (None, [f"data.resolution={resolution}"])
    run = load_config(config, defaults).data
    if run.sources:  # a mix of datasets: the held-out data is what the overrides name, never the mix
        defaults += ["data.sources=[]"]
    held_out = load_config(config, defaults + overrides).data
    return run, read_in_order(held_out)


def read_in_order(held_out: DataConfig) -> DataConfig:
    """`held_out` read deterministically: centre crop, no flip, no caption dropout, no shuffle buffer, no cache, no
    workers, one pass even where the run resampled its shards."""
    return dataclasses.replace(held_out, center_crop=True, random_flip=False, caption_dropout=0.0,
                               shuffle_buffer=0, cache=False, num_workers=0, persistent_workers=False,
                               resampled=False,  # one pass: each held-out pair once
                               num_samples=held_out.num_samples if held_out.source == "builtin" else None)


def is_training_data(run: DataConfig, held_out: DataConfig) -> bool:
    """Whether `held_out` reads the pairs the run trained on (one of its datasets'; the built-in set's held-out
    renderings never do)."""
    fields = ("source", "path", "split")
    if run.sources and held_out.source == "builtin" and held_out.path is None:
        return True  # (no --data: only the mix itself)
    sections = [section for section, _ in entries(run)] if run.sources else [run]
    return any(section.source != "builtin" and all(getattr(section, f) == getattr(held_out, f) for f in fields)
               for section in sections)


def held_out_source(data: DataConfig, max_samples: int):
    """The built-in set's held-out renderings, or the source `data` names."""
    if data.source == "builtin":
        return HeldOutShapes(max_samples, tuple(data.colors or DEFAULT_COLORS))
    return build_source(data, 0)


def held_out_pairs(source, data: DataConfig, max_samples: int, seed: int = 0) -> tuple[list[dict], Counter]:
    """The first `max_samples` usable pairs `{"key", "pixels" (3, H, W) in [-1, 1], "caption", "original_size",
    "crop_top_left"}` of `source` in a fixed order, passed through the data section's filters and transforms as in
    training (the size of the image file and where the crop starts, as the stream gives SDXL's micro-conditioning);
    and the counts of the samples left out."""
    counts, rng, pairs = Counter(), random.Random(f"held-out-{seed}"), []
    for raw in source.samples(random.Random(f"order-{seed}"), 0, 1, counts):
        caption = pick_caption(raw.caption, rng)
        reason = failed_filter(raw.metadata, caption, data.filters)
        reason = reason or ("no image" if raw.image is None else "no caption" if caption is None else None)
        if reason is None:
            try:
                image = decode_rgb(raw.image, data.max_image_pixels, min_size=data.resolution)
                pixels, crop = crop_square(image, data.resolution, center_crop=True, random_flip=False, rng=rng)
            except Exception as error:  # noqa: BLE001 - an unreadable sample is left out and counted, as in training
                reason = unreadable_reason(error)
        if reason is not None:
            counts[reason] += 1
            continue
        width, height = image.info["source_size"]
        pairs.append({"key": raw.key, "pixels": to_unit_range(pixels), "caption": caption,
                      "original_size": torch.tensor([height, width]), "crop_top_left": torch.tensor(crop)})
        if len(pairs) == max_samples:
            break
    return pairs, counts


def describe_data(data: DataConfig) -> str:
    if data.sources:
        return "a mix of " + ", ".join(f"{section.source}: {section.path}" for section, _ in entries(data))
    if data.source == "builtin":
        return f"builtin held-out renderings (seed {HELDOUT_SEED}; colours {', '.join(data.colors or DEFAULT_COLORS)})"
    return f"{data.source}: {data.path}" + (f" (split {data.split})" if data.source == "hf" else "")


# ---- validation loss ---------------------------------------------------------------------------


@torch.no_grad()
def clean_samples(vae, pixels: torch.Tensor) -> torch.Tensor:
    """x_0 as the model sees it: the pixels, or for a latent model the mean of the VAE's latent distribution
    times its scaling factor (training draws a latent from that distribution; the mean keeps the number free
    of that draw)."""
    if vae is None:
        return pixels
    moments = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return moments.float() * vae.config.scaling_factor


def conditioning(pipeline, family: TwoEncodersXL | None, pairs: list[dict], pixels: torch.Tensor,
                 device: torch.device) -> dict:
    """The UNet's keyword arguments for the pairs' captions as training conditions it (`families.py`): this
    project's pipeline's prompt encoding; for an SDXL pipeline (`family`, its two encoders) both encoders' outputs,
    the pooled embedding and each pair's size-and-crop time ids (the target size: `pixels`')."""
    captions = [p["caption"] for p in pairs]
    if family is None:
        return {"encoder_hidden_states": pipeline.encode_prompt(captions, device)}
    ids = torch.cat([tokenize(pipeline.tokenizer, captions), tokenize(pipeline.tokenizer_2, captions)], dim=1)
    sizes = {"pixel_values": pixels, **{k: torch.stack([p[k] for p in pairs]) for k in ("original_size",
                                                                                         "crop_top_left")}}
    with torch.no_grad():
        return family.unet_kwargs(family.embed(ids, device), sizes, device)


def validation_loss(pipeline, pairs: list[dict], timesteps: list[int], seed: int = 0, batch_size: int = 32,
                    progress: bool = False) -> dict:
    """The objective's loss on `pairs` at each of `timesteps`, averaged over the pairs, and its mean over the
    timesteps. Sample i gets the noise `metrics.fixed_noise(shape, seed, i)` at every timestep, whatever the batch
    size. The objective is the model's own (its scheduler's prediction type) under this project's DDPMScheduler
    with the model's schedule, as training uses it, conditioned as training conditions it (this project's pipeline
    or an SDXL one). `progress`: a bar counts the pairs."""
    if not pairs:
        raise ValueError("no held-out pairs to compute the validation loss on")
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    device = pipeline.unet.device
    family = None if getattr(pipeline, "text_encoder_2", None) is None else TwoEncodersXL(
        pipeline.text_encoder, pipeline.text_encoder_2, pipeline.tokenizer, pipeline.tokenizer_2,
        pipeline.config.get("force_zeros_for_empty_prompt", True))
    totals = torch.zeros(len(timesteps), dtype=torch.float64)
    bar = tqdm(total=len(pairs), desc="validation loss", unit="pair", disable=not progress)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        pixels = torch.stack([p["pixels"] for p in batch])
        samples = clean_samples(pipeline.vae, pixels.to(device))
        noise = torch.stack([metrics.fixed_noise(samples.shape[1:], seed, start + i) for i in range(len(batch))])
        losses = metrics.timestep_losses(pipeline.unet, scheduler, samples,
                                         conditioning(pipeline, family, batch, pixels, device), noise.to(device),
                                         timesteps)
        totals += losses * len(batch)  # each loss is a batch mean; weigh by the batch's size
        bar.update(len(batch))
    bar.close()
    per_timestep = (totals / len(pairs)).tolist()
    return {"mean": float(np.mean(per_timestep)), "per_timestep": dict(zip(timesteps, per_timestep)),
            "timesteps": timesteps, "num_samples": len(pairs), "seed": seed,
            "prediction_type": scheduler.config.prediction_type}
