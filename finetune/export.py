"""The trained result as users get it: the pipeline (or a LoRA's adapters) with the EMA weights when EMA is on,
sampled for validation during training and written to the output folder at the end."""

import contextlib
import dataclasses
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel

from . import lora
from .config import Config
from .distributed import check_in_sync
from .models import Components, trainable
from .validation import log_validation

logger = get_logger("finetune")


@contextlib.contextmanager
def exported(accelerator: Accelerator, components: Components, emas: list[EMAModel]):
    """The pipeline to sample and save: unwrapped models in eval mode (no adapter dropout) with the EMA weights,
    when EMA is on, in place of the trained ones; the training weights and mode come back afterwards. A compiled
    UNet samples eagerly: compiling the sampling shapes would take longer than the few samples it speeds up."""
    models = [accelerator.unwrap_model(components.unet), accelerator.unwrap_model(components.text_encoder)]
    modes = [model.training for model in models]
    for ema, model in zip(emas, models):
        ema.store(trainable(model))
        ema.copy_to(trainable(model))
    for model in models:
        model.eval()
    try:
        with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            yield dataclasses.replace(components, unet=models[0], text_encoder=models[1])
    finally:
        for ema, model in zip(emas, models):
            ema.restore(trainable(model))
        for model, mode in zip(models, modes):
            model.train(mode)


def validate(accelerator, config: Config, components: Components, emas: list[EMAModel], step: int) -> None:
    if accelerator.is_main_process:
        with exported(accelerator, components, emas) as models:
            path = log_validation(models.pipeline(), config.validation, step, config.train.output_dir,
                                  accelerator.trackers)
        logger.info(f"step {step}: samples in {path}")
    accelerator.wait_for_everyone()


def export(accelerator: Accelerator, config: Config, components: Components, emas: list, step: int) -> Path | None:
    """Write the result (EMA weights when enabled) to output_dir: the whole pipeline, or for a LoRA run the
    adapters alone (`pytorch_lora_weights.safetensors`, loaded onto the base with `load_lora_weights`); then a
    final sample grid, whose path it returns on the main process."""
    check_in_sync(accelerator, [components.unet, components.text_encoder])  # every trained tensor
    if not accelerator.is_main_process:
        return None
    out = config.train.output_dir
    with exported(accelerator, components, emas) as models:
        if config.lora.enabled:
            lora.save(out, models.unet, models.text_encoder if config.lora.train_text_encoder else None)
        else:
            models.pipeline().save_pretrained(out)
        return log_validation(models.pipeline(), config.validation, step, out, accelerator.trackers)
