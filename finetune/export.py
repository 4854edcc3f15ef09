"""The trained result as users get it: the pipeline (or a LoRA's adapters) with the EMA weights when EMA is on,
sampled for validation during training and written to the output folder at the end; and a checkpoint exported the
same way, as the trainer would have exported it at that step.

    python -m finetune.export outputs/shapes/checkpoint-1000      # writes outputs/shapes/checkpoint-1000/pipeline
    python -m finetune.export outputs/shapes/checkpoint-1000 --output-dir shapes-1000

A checkpoint holds the training state (accelerate's `save_state`: the trained models, or a LoRA run's adapters
only; the EMA; the run's config.yaml). The export rebuilds the run's components from that config.yaml (the base
it names, or a from-scratch model whose word-level tokenizer is rebuilt from the training captions, so that data
must be where the run read it), loads the checkpoint's weights, swaps in the EMA weights when the run used EMA and
writes the pipeline (a LoRA run: its adapters and config.yaml, a folder that loads like the run's output).
The default place is inside the checkpoint: the rotation of old checkpoints (`train.checkpoints_total_limit`)
removes it with them, and the run's output folder keeps the layout the README shows. An export of the same
checkpoint written after it is reused; `python -m finetune.sample`, `evaluate` and `visualize` export a checkpoint
folder given to them this way first.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel, cast_training_params

from . import checkpointing, embeddings, lora, sharding, single_file
from .cli import ToolParser, UserError, run
from .config import Config, DataConfig, TrainConfig, load_config
from .data import build_source, caption_texts
from .distributed import check_in_sync
from .models import (
    Components,
    build_components,
    frozen_dtype,
    frozen_models,
    load_components,
    set_training,
    trainable,
    trained_in_full,
)
from .performance import averaged_weights
from .results import hide_library_progress
from .validation import BASE_GRID, log_held_out_loss, log_validation, sample_grid

logger = get_logger("finetune")

EXPORT_DIR = "pipeline"  # a checkpoint's export, inside it
EXPORTED_FROM = "exported_from.json"  # in an export: the checkpoint it came from


@contextlib.contextmanager
def exported(accelerator: Accelerator, components: Components, emas: list[EMAModel], optimizer=None):
    """The pipeline to sample and save: unwrapped models in eval mode (no adapter dropout) with the EMA weights,
    when EMA is on, or a schedule-free optimizer's average, in place of the trained ones; the training weights and
    mode come back afterwards. A compiled UNet samples eagerly: compiling the sampling shapes would take longer than
    the few samples it speeds up. Every process enters; only the main process may use what it yields: under FSDP
    every process swaps its shards and they gather whole models onto the main process (the others get None for
    them); otherwise the other processes do nothing."""
    if not accelerator.is_main_process and not sharding.is_sharded(accelerator):
        yield components  # unsharded, only the main process samples and saves: the others swap nothing
        return
    models = [accelerator.unwrap_model(model) for model in (components.unet, *components.text_encoders)]
    modes = [model.training for model in models]
    for ema, model in zip(emas, models):
        ema.store(trainable(model))
        ema.copy_to(trainable(model))
    for model in models:
        model.eval()
    whole = []
    try:
        with accelerator.autocast(), torch.compiler.set_stance("force_eager"), averaged_weights(optimizer):
            whole = sharding.whole(accelerator, models)
            yield dataclasses.replace(components, unet=whole[0], text_encoder=whole[1],
                                      text_encoder_2=whole[2] if len(whole) > 2 else None)
    finally:
        sharding.release(accelerator, whole)
        for ema, model in zip(emas, models):
            ema.restore(trainable(model))
        for model, mode in zip(models, modes):
            set_training(model, mode)


def validate(accelerator, config: Config, components: Components, emas: list[EMAModel], step: int,
             optimizer=None) -> None:
    with exported(accelerator, components, emas, optimizer) as models:
        if accelerator.is_main_process:
            pipeline = models.pipeline()
            path = log_validation(pipeline, config.validation, step, config.train.output_dir, accelerator.trackers)
            log_held_out_loss(pipeline, config.data, config.validation, step, accelerator.trackers,
                              config.train.train_batch_size)
            logger.info(f"step {step}: samples in {path}")
    accelerator.wait_for_everyone()


def draw_base(accelerator: Accelerator, config: Config, components: Components, emas: list, step: int) -> None:
    """Before the first step of a fine-tune (a base in model.pretrained_model_name_or_path; not when resuming): the
    validation grid of the base itself, `samples/base.png`, to set beside every later grid. Before any step the model
    is the base: LoRA adapters start as no change, a full fine-tune from the base's weights."""
    if step or not config.model.pretrained_model_name_or_path or not config.validation.compare_with_base:
        return
    with exported(accelerator, components, emas) as models:
        if accelerator.is_main_process:
            pipeline = models.pipeline()
            pipeline.set_progress_bar_config(disable=True)
            path = Path(config.train.output_dir) / "samples" / BASE_GRID
            path.parent.mkdir(parents=True, exist_ok=True)
            sample_grid(pipeline, config.validation).save(path)
            logger.info(f"the base's own grid, to compare with: {path}")
    accelerator.wait_for_everyone()


def export(accelerator: Accelerator, config: Config, components: Components, emas: list, step: int,
           optimizer=None) -> Path | None:
    """Write the result (EMA weights when enabled) to output_dir: the whole pipeline, or for a LoRA run the
    adapters alone (`pytorch_lora_weights.safetensors`, loaded onto the base with `load_lora_weights`), and with
    textual inversion a file per new token (`load_textual_inversion`); then a final sample grid, whose path it
    returns on the main process."""
    check_in_sync(accelerator, [components.unet, *components.text_encoders])  # every trained tensor
    out = config.train.output_dir
    with exported(accelerator, components, emas, optimizer) as models:
        if not accelerator.is_main_process:
            return None
        if config.lora.enabled:
            lora.save_run(out, models, config.lora)
        elif not config.textual_inversion.enabled:
            save_pipeline(models, out, config.train, Path(out).name)
        embeddings.save(out, models, config.textual_inversion)  # (textual inversion: its tokens' files)
        grid = log_validation(models.pipeline(), config.validation, step, out, accelerator.trackers)
        log_held_out_loss(models.pipeline(), config.data, config.validation, step, accelerator.trackers,
                          config.train.train_batch_size)
        return grid


def save_pipeline(components: Components, out: str | Path, train: TrainConfig, name: str) -> None:
    """A full fine-tune's pipeline folder and, with `train.export_single_file`, its single-file form in it
    (`<name>.safetensors`, the original layout ComfyUI and AUTOMATIC1111 load)."""
    components.pipeline().save_pretrained(out)
    if train.export_single_file:
        single_file.save(components, Path(out) / f"{name}.safetensors", train.single_file_precision, name)


# ---- a checkpoint, exported -----------------------------------------------------------------------------------


def rebuild_model(config: Config, mixed_precision: str) -> tuple[Components, list[torch.nn.Module]]:
    """The run's components as `train.build_model` made them, on the CPU without its speed-ups: the base loaded or
    the models built from the seed (a frozen from-scratch text encoder is its seeded initial weights), adapters
    attached for LoRA, frozen models in the precision the run trained in. Returns them and the models that train,
    in the order accelerate saved them (`model.safetensors`, `model_1.safetensors`)."""
    set_seed(config.train.seed)  # as the trainer seeds before building
    base = config.model.pretrained_model_name_or_path
    if base:
        try:
            components = load_components(config.model)
        except OSError as error:
            raise UserError(f"the run's base, model.pretrained_model_name_or_path={base!r}, could not be loaded "
                            f"({error}); make it available (a folder, or the Hub with HF_HUB_OFFLINE unset) to export "
                            "this checkpoint") from error
    else:
        captions = training_captions(config.data, config.train.seed)
        components = build_components(config.model, config.data.resolution, captions)
    ti = config.textual_inversion
    embeddings.add_tokens(components, ti)
    if config.lora.enabled:
        return components, embeddings.train_rows(components, ti, lora.attach(components, config.lora), alone=False)
    trained = embeddings.train_rows(components, ti, trained_in_full(components, config.model), alone=True)
    for model in frozen_models(components, trained, lora=config.textual_inversion.enabled):
        dtype = frozen_dtype(components, model, config.model, mixed_precision)
        if model.dtype != dtype:
            model.to(dtype)
    cast_training_params(trained, dtype=torch.float32)
    return components, trained


def training_captions(data: DataConfig, seed: int) -> list[str]:
    """The captions a from-scratch run built its word-level tokenizer from: its training data must be where the
    run read it (the built-in set's vocabulary is its grammar, nothing to read)."""
    if data.source == "builtin" and not data.sources:
        return caption_texts(data, None)
    try:
        texts, problem = caption_texts(data, build_source(data, seed)), "no captions found there"
    except (OSError, ValueError, RuntimeError) as error:
        texts, problem = [], f"{type(error).__name__}: {error}"
    if not texts:
        raise UserError(f"a from-scratch run's tokenizer is rebuilt from its training captions, but "
                        f"{data_location(data)} could not be read ({problem}); run this where that data is (a "
                        "relative path is read from the current folder)")
    return texts


def check_vocabulary(components: Components, text_encoder: dict[str, torch.Tensor], data: DataConfig) -> None:
    """The rebuilt tokenizer must have as many tokens as the checkpoint's text encoder has embedding rows: a different
    count means the captions read now are not the ones the run built its vocabulary from."""
    rows = next((v.shape[0] for k, v in text_encoder.items() if k.endswith("token_embedding.weight")), None)
    if rows is not None and rows != len(components.tokenizer):
        raise UserError(f"the tokenizer rebuilt from the training captions ({data_location(data)}) has "
                        f"{len(components.tokenizer)} tokens but the checkpoint's text encoder has {rows}: the data "
                        "changed since the run; export with the data the run trained on")


def data_location(data: DataConfig) -> str:
    if data.sources:
        return "data.sources=" + ", ".join(f"{entry.get('source')}:{entry.get('path')}" for entry in data.sources)
    return f"data.source={data.source}" + (f" data.path={data.path!r}" if data.path else "")


def load_trained_weights(checkpoint: Path, trained: list[torch.nn.Module], adapters_only: bool) -> None:
    """Put the weights of `checkpoint` into the models that trained: whole models, or for LoRA the adapters (the base
    comes from the base, as `lora.AdapterCheckpoints` loads them)."""
    found = checkpointing.trained_model_count(checkpoint)
    if found != len(trained):
        raise UserError(f"checkpoint {checkpoint} holds {found} trained models but its "
                        f"config.yaml trains {len(trained)}; was config.yaml edited?")
    for i, model in enumerate(trained):
        state = checkpointing.model_weights(checkpoint, i)
        result = model.load_state_dict(state, strict=False)
        expected = {name for name, p in model.named_parameters() if p.requires_grad} if adapters_only else None
        differ = result.unexpected_keys + ([] if adapters_only else result.missing_keys)
        if differ or (adapters_only and set(state) != expected):
            raise UserError(f"checkpoint {checkpoint}: the weights of model {i} do not fit the model its config.yaml "
                            f"builds (e.g. {(differ or sorted(set(state) ^ expected))[0]}); was config.yaml edited?")


def swap_in_ema(checkpoint: Path, trained: list[torch.nn.Module]) -> None:
    """Copy each EMA's averaged weights over its model's trainable weights, as `exported` does at the end of a run."""
    for i, model in enumerate(trained):
        shadows, params = checkpointing.ema_weights(checkpoint, i), trainable(model)
        if shadows is None or [s.shape for s in shadows] != [p.shape for p in params]:
            raise UserError(f"checkpoint {checkpoint}: {checkpointing.EMA.format(i)} is missing or does not fit model "
                            f"{i}, though its config.yaml has train.use_ema: true")
        with torch.no_grad():
            for param, shadow in zip(params, shadows):
                param.copy_(shadow)


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Write to `out` what the trainer would have exported at the checkpoint's step (the pipeline, or a LoRA's adapters
    with the run's config.yaml naming the base; EMA weights when the run used EMA), and `EXPORTED_FROM` saying which
    checkpoint it is. Written beside `out` and renamed into place, so a half-written export is never reused."""
    manifest = checkpointing.read_manifest(checkpoint)
    if not (checkpoint / checkpointing.CONFIG).is_file():
        raise UserError(f"checkpoint {checkpoint} has no {checkpointing.CONFIG} (an older version did not keep the "
                        "run's config there), so the model cannot be rebuilt; resume the run from it with this version "
                        "and export a later checkpoint")
    config = load_config(checkpoint / checkpointing.CONFIG)
    if config.train.optimizer == "adamw_schedulefree":
        raise UserError(f"checkpoint {checkpoint} is of an adamw_schedulefree run: it holds the training weights, not "
                        "the average that is sampled and saved; resume the run to its end (train.max_train_steps "
                        "sets where) to get the averaged export")
    components, trained = rebuild_model(config, manifest.get("mixed_precision", "no"))
    if not config.model.pretrained_model_name_or_path and len(trained) > 1:
        check_vocabulary(components, checkpointing.model_weights(checkpoint, 1), config.data)
    load_trained_weights(checkpoint, trained, config.lora.enabled or config.textual_inversion.enabled)
    if config.train.use_ema:
        swap_in_ema(checkpoint, trained)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if config.lora.enabled or config.textual_inversion.enabled:
        tmp.mkdir(parents=True)
    if config.lora.enabled:
        lora.save_run(tmp, components, config.lora, f"{Path(config.train.output_dir).name}-{checkpoint.name}")
    elif not config.textual_inversion.enabled:
        save_pipeline(components, tmp, config.train, f"{Path(config.train.output_dir).name}-{checkpoint.name}")
    embeddings.save(tmp, components, config.textual_inversion)
    shutil.copyfile(checkpoint / checkpointing.CONFIG, tmp / checkpointing.CONFIG)
    (tmp / EXPORTED_FROM).write_text(json.dumps(export_record(checkpoint), indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)  # an earlier export (exported_checkpoint never replaces anything else)
    os.replace(tmp, out)
    return out


def export_record(checkpoint: Path) -> dict:
    """What identifies the checkpoint an export came from: its folder, step and the SHA-256 of its manifest (which
    lists its files, their sizes and the config's hash)."""
    manifest = (checkpoint / checkpointing.MANIFEST).read_bytes()
    return {"checkpoint": str(checkpoint.resolve()), "step": json.loads(manifest)["step"],
            "manifest_sha256": hashlib.sha256(manifest).hexdigest()}


def is_export_of(out: Path, checkpoint: Path) -> bool:
    """Whether `out` is a complete export of this very checkpoint, written after it."""
    record, manifest = out / EXPORTED_FROM, checkpoint / checkpointing.MANIFEST
    try:
        recorded = json.loads(record.read_text())["manifest_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    fresh = record.stat().st_mtime >= manifest.stat().st_mtime
    return fresh and recorded == export_record(checkpoint)["manifest_sha256"]


def exported_checkpoint(checkpoint: str | os.PathLike,
                        output_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The export of `checkpoint` (in `output_dir`, default `<checkpoint>/pipeline`) and whether it was written now:
    an export of this checkpoint written after it is reused. Only an earlier export (or nothing, or an empty
    folder) is replaced."""
    checkpoint = Path(checkpoint)
    out = Path(output_dir) if output_dir else checkpoint / EXPORT_DIR
    if is_export_of(out, checkpoint):
        return out, False
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORTED_FROM).is_file():
        raise UserError(f"--output-dir {out} exists and is not an export of a checkpoint; give a new or empty folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file; give a folder")
    try:
        return export_checkpoint(checkpoint, out), True
    except PermissionError as error:
        raise UserError(f"cannot write the export of {checkpoint} to {out} ({error}); export it elsewhere with "
                        f"python -m finetune.export {checkpoint} --output-dir DIR, and use DIR") from error


def main(argv: list[str] | None = None) -> Path:
    parser = ToolParser(prog="python -m finetune.export", description=__doc__)
    parser.add_argument("checkpoint", help="a run's checkpoint folder, <train.output_dir>/checkpoint-N")
    parser.add_argument("--output-dir", help=f"where to write it (default: CHECKPOINT/{EXPORT_DIR}; a new or empty "
                                             "folder, or an earlier export)")
    args = parser.parse_args(argv)
    hide_library_progress()
    checkpoint = Path(args.checkpoint)
    if not checkpointing.is_checkpoint(checkpoint):
        raise UserError(f"{checkpoint} is not a training checkpoint (no {checkpointing.MANIFEST}); pass a run's "
                        "<train.output_dir>/checkpoint-N folder")
    out, written = exported_checkpoint(checkpoint, args.output_dir)
    step = json.loads((out / EXPORTED_FROM).read_text())["step"]
    print(f"{'exported' if written else 'already exported:'} {checkpoint} (step {step}) to {out}")
    return out


if __name__ == "__main__":
    run(main)
