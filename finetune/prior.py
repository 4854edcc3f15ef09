"""DreamBooth's prior preservation (`prior:`): while a few images teach the model a subject, keep what it draws for
the subject's class. Two ways:

- `class_images` (Ruiz et al. 2022, as diffusers' train_dreambooth and kohya do): the base draws
  `num_class_images` images of `class_prompt` once, before the first step; they are cached under a key of the base's
  weights and every setting that shapes them (a rerun with the same key draws none), and train as a regularisation
  dataset of `data.sources` (loss weight `prior_loss_weight`, logged as loss_regularisation).
- `base_prediction` (no images): every batch also trains on its own images under `class_prompt`, with the frozen
  base's prediction (adapters disabled) as the target, so the adapter learns to leave the class as the base drew
  it. LoRA runs only: the base is the model with its adapters off.

The processes of each machine draw the class images in fixed groups dealt to them (group g by process g % processes),
write each file atomically, then wait for the others' files by looking at the folder: no collective that a long
generation could time out.
"""

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import time
from pathlib import Path

import torch

from .cli import UserError
from .config import ConfigError, DataConfig, PriorConfig
from .disk_cache import fingerprint
from .families import tokenize
from .models import set_training
from .objective import min_snr_weights, sample_losses, sample_noise_and_timesteps

logger = logging.getLogger(__name__)
# peft's adapter weights (LoRA, DoRA, LoHa, LoKr, OFT, ...) in a model's state dict
ADAPTER_WEIGHT = re.compile(r"\.(lora_|hada_|lokr_|oft_|boft_|vera_)[^.]*(\.|$)")


def class_folder(prior: PriorConfig, components, resolution: int) -> Path:
    """Where the class images of these settings are (or will be): `class_data_dir` (default: the finetune cache)
    / a key of the base's weights and tokenizers, the prompts, count, size, seed and sampler."""
    models = [m for m in (components.unet, components.text_encoder, components.text_encoder_2, components.vae) if m]
    sampler = components.sampler or components.scheduler
    tokenizers = [(type(t).__name__, len(t), t.model_max_length) for t in components.tokenizers]
    key = fingerprint(base_weights(models), tokenizers, components.force_zeros_for_empty_prompt, prior.class_prompt,
                      prior.negative_prompt, prior.num_class_images, prior.sample_batch_size, resolution, prior.seed,
                      prior.num_inference_steps, prior.guidance_scale, type(sampler).__name__,
                      # (not diffusers' private keys: `_use_default_values` lists a set, in another order per process)
                      sorted((k, v) for k, v in sampler.config.items() if not k.startswith("_")))
    root = prior.class_data_dir or os.path.join(os.environ.get("FINETUNE_CACHE", "~/.cache/finetune"), "class-images")
    return Path(root).expanduser() / key


def base_weights(models: list) -> str:
    """A hash of the base's weights as the models hold them (dtype included: a base drawn in bf16 draws other
    images than in fp32; a quantized one by its dequantized values), without the adapters a LoRA run has put on
    them (their initial weights change nothing the base draws) and with the wrapped layers under their own names, so
    the LoRA run's rank and seed do not change it."""
    digest = hashlib.sha256()
    for model in models:
        for name, tensor in model.state_dict().items():
            if ADAPTER_WEIGHT.search(name):
                continue
            tensor = tensor.detach()
            if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "dequantize"):
                tensor = tensor.dequantize()  # (torchao's int8 / fp8 weights have no byte view)
            name = name.replace(".base_layer.", ".")
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def draw_class_images(prior: PriorConfig, components, resolution: int, rank: int, world_size: int,
                      drawing=contextlib.nullcontext) -> tuple[Path, int]:
    """The class images' folder, with every image in it (`<index>.png` and its caption `<index>.txt`). The images
    are drawn in fixed groups of `sample_batch_size` (image i from a generator seeded `seed + i`), group g by process
    g % world_size, so an image's batch is the same however many processes draw (on a GPU too); a group with an
    image missing is drawn again whole. Then it waits for the other processes' files. Returns the folder and how
    many images this process drew. Call it before the first step, while the weights are the base's (LoRA adapters
    start as no change), inside `drawing()` (the run's autocast)."""
    folder = class_folder(prior, components, resolution)
    folder.mkdir(parents=True, exist_ok=True)
    size = prior.sample_batch_size
    groups = [list(range(start, min(start + size, prior.num_class_images)))
              for start in range(0, prior.num_class_images, size)]
    mine = [group for g, group in enumerate(groups) if g % world_size == rank
            and not all((folder / f"{i:05d}.png").is_file() for i in group)]
    if mine:
        pipeline = components.pipeline()
        pipeline.set_progress_bar_config(disable=True)
        logger.info("drawing %d class images of %r into %s", sum(map(len, mine)), prior.class_prompt, folder)
        models = [m for m in (components.unet, *components.text_encoders) if m is not None]
        modes = [m.training for m in models]
        for model in models:
            model.eval()  # (no adapter dropout)
        try:
            for group in mine:
                with torch.no_grad(), drawing(), torch.compiler.set_stance("force_eager"):
                    images = pipeline([prior.class_prompt] * len(group),
                                      negative_prompt=[prior.negative_prompt] * len(group) if prior.negative_prompt
                                      else None, height=resolution, width=resolution,
                                      num_inference_steps=prior.num_inference_steps,
                                      guidance_scale=prior.guidance_scale,
                                      generator=[torch.Generator().manual_seed(prior.seed + i) for i in group],
                                      output_type="pil").images
                for i, image in zip(group, images):
                    _write(folder / f"{i:05d}.txt", prior.class_prompt.encode())
                    partial = folder / f".{i:05d}.png.{os.getpid()}"
                    image.save(partial, format="PNG")
                    os.replace(partial, folder / f"{i:05d}.png")  # whole or absent: never half an image
        finally:
            for model, mode in zip(models, modes):
                set_training(model, mode)
    _wait_for(folder, prior.num_class_images)
    return folder, sum(map(len, mine))


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


def _wait_for(folder: Path, count: int, poll: float = 1.0) -> None:
    """Until the folder holds all `count` images (the other processes draw theirs), saying every minute how far."""
    said = time.monotonic()
    while (have := sum((folder / f"{i:05d}.png").is_file() for i in range(count))) < count:
        if time.monotonic() - said > 60:
            logger.info("waiting for the other processes' class images: %d of %d in %s (on several machines each "
                        "draws the set into its own prior.class_data_dir, or all share one)", have, count, folder)
            said = time.monotonic()
        time.sleep(poll)


def add_class_images(prior: PriorConfig, data: DataConfig, components, source, accelerator, seed: int,
                     dry_run: bool = False) -> tuple:
    """The source and data section of the run's data with the class images added: drawn now when missing, under
    the run's autocast, by the processes of this machine (each machine draws the set into its own class_data_dir,
    or they share one), checked as a data section first. A dry run draws nothing: it says how many are there and
    reads the data alone."""
    from .data import build_source

    rank = accelerator.local_process_index
    world_size = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))

    data_with = with_class_images(data, Path("class-images"), prior, source.num_samples)  # (checked before drawing)
    folder = class_folder(prior, components, data.resolution)
    if dry_run:
        have = sum((folder / f"{i:05d}.png").is_file() for i in range(prior.num_class_images))
        logger.info("dry run: %d of %d class images in %s; a run draws the rest first", have, prior.num_class_images,
                    folder)
        return source, data
    folder, drawn = draw_class_images(prior, components, data.resolution, rank, world_size, accelerator.autocast)
    logger.info("%d class images of %r in %s (%d drawn by this process)", prior.num_class_images, prior.class_prompt,
                folder, drawn)
    data_with = dataclasses.replace(data_with, sources=[*data_with.sources[:-1],
                                                        {**data_with.sources[-1], "path": str(folder)}])
    return build_source(data_with, seed), data_with


def with_class_images(data: DataConfig, folder: Path, prior: PriorConfig, planned: int | None) -> DataConfig:
    """The data section with the class images as one more dataset (a regularisation one, weighing
    `prior_loss_weight`, captioned `class_prompt` without dropout, none of the section's caption or filter
    settings): as many samples an epoch as the other datasets give together (diffusers pairs each instance image
    with a class image), or one pass when that is not known. A run on one dataset becomes a mix of it and the class
    images; every dataset's settings are spelt out in its entry, so the section keeps only the run-wide keys."""
    from .data.mixing import RUN_WIDE, entries

    def own(section: DataConfig) -> dict:
        return {k: v for k, v in dataclasses.asdict(section).items() if k not in RUN_WIDE}

    if data.sources:
        sources = [{**own(section), **dataclasses.asdict(entry)} for section, entry in entries(data)]
    else:
        sources = [{**own(data), "name": "instance"}]
    entry = {**own(DataConfig()), "source": "imagefolder", "path": str(folder), "name": "class_images",
             "is_regularisation": True, "loss_weight": prior.prior_loss_weight, "default_caption": prior.class_prompt,
             "caption_dropout": 0.0, **({"samples_per_epoch": planned} if planned else {})}
    run_wide = {k: v for k, v in dataclasses.asdict(data).items() if k in RUN_WIDE and k not in ("sources",
                                                                                                 "kohya_toml")}
    problems: list[str] = []
    from .config import _build

    combined = _build(DataConfig, {**run_wide, "sources": [*sources, entry]}, "data", problems)
    if problems:
        raise ConfigError([f"prior.mode: class_images: the data with the class images is not a valid data section: "
                           f"{problem}" for problem in problems])
    return combined


def base_prediction(prior: PriorConfig, components, accelerator) -> "BasePrediction | None":
    """With prior.mode: base_prediction, what turns each batch's loss into the prior-preserving one (after
    accelerate's wrapping: the UNet it turns the adapters off on is the unwrapped one); otherwise None."""
    if prior.mode != "base_prediction":
        return None
    from . import sharding

    return BasePrediction(prior, components.tokenizers, accelerator.unwrap_model(components.unet),
                          accelerator.autocast, sharding.is_sharded(accelerator))


class BasePrediction:
    """`base_prediction`: the batch again under the class prompt, with fresh noise and timesteps, its target the
    frozen base's prediction (the adapters off, no gradient, under the run's autocast). The trained model sees both
    halves in one forward pass (one pass per backward, as DDP wants), and the loss is diffusers' DreamBooth loss:
    the instance half's loss + prior_loss_weight x the class half's."""

    def __init__(self, prior: PriorConfig, tokenizers: list, unet, autocast, sharded: bool = False):
        if sharded:  # (turning a sharded model's adapters off and on between passes is not tested)
            raise UserError("prior.mode: base_prediction is not supported under FSDP; use prior.mode: class_images, "
                            "or train with DDP (distributed_type: MULTI_GPU)")
        self.weight, self.unet, self.autocast = prior.prior_loss_weight, unet, autocast
        # The base's own dropout (none in SD / SDXL UNets), off for the target: only these switch mode each step.
        self.dropouts = [module for name, module in unet.named_modules()
                         if isinstance(module, torch.nn.Dropout) and module.p > 0 and "lora_" not in name]
        self.ids = {name: tokenize(tokenizer, [prior.class_prompt])
                    for name, tokenizer in zip(("input_ids", "input_ids_2"), tokenizers)}

    def target(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The base's prediction: the model with its adapters off and the base's own dropout off."""
        with torch.no_grad(), self.autocast():
            self.unet.disable_adapters()
            modes = [module.training for module in self.dropouts]
            for module in self.dropouts:
                module.eval()
            try:
                return self.unet(noisy, timesteps, **conditioning, return_dict=False)[0].float()
            finally:
                for module, mode in zip(self.dropouts, modes):
                    module.train(mode)
                self.unet.enable_adapters()

    def loss(self, batch: dict, samples, noisy, timesteps, conditioning: dict, target, unet, encoder, scheduler,
             train, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss, and the instance and class halves' sums and counts for the logs (`objective.dataset_loss`)."""
        size = samples.shape[0]
        class_batch = {**batch, **{name: ids.expand(size, -1) for name, ids in self.ids.items()}}
        class_conditioning = encoder.conditioning(class_batch, device)
        noise, class_timesteps = sample_noise_and_timesteps(samples, scheduler.config.num_train_timesteps)
        class_noisy = scheduler.add_noise(samples, noise, class_timesteps)
        base = self.target(class_noisy, class_timesteps, class_conditioning)
        model_pred = unet(torch.cat([noisy, class_noisy]), torch.cat([timesteps, class_timesteps]),
                          **_cat(conditioning, class_conditioning), return_dict=False)[0]
        both = torch.cat([timesteps, class_timesteps])
        weights = min_snr_weights(scheduler, both, train.snr_gamma) if train.snr_gamma else torch.ones(2 * size,
                                                                                                         device=device)
        losses = sample_losses(model_pred, torch.cat([target, base])) * weights
        instance = losses[:size] * batch["loss_weight"].to(device, non_blocking=True) if "loss_weight" in batch \
            else losses[:size]
        loss = instance.mean() + self.weight * losses[size:].mean()
        sums, count = losses.detach(), torch.full((), float(size), device=device)  # (made there: no host copy)
        return loss, torch.stack([sums[:size].sum(), count, sums[size:].sum(), count])


def _cat(a, b):
    """Two UNet keyword-argument mappings (nested for SDXL's added_cond_kwargs) joined along the batch."""
    if isinstance(a, dict):
        return {key: _cat(a[key], b[key]) for key in a}
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else a
