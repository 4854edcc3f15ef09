"""Train a text-conditioned DDPM: config -> accelerator -> models -> data -> optimizer -> resume -> loop -> export.

    accelerate launch --config_file accelerate_config.yaml finetune/train.py --config configs/shapes.yaml \
        [section.key=value ...] [--dry-run]
"""

import itertools
import logging
import math
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`accelerate launch finetune/train.py`): import as the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "finetune"
    import finetune  # noqa: F401 - first, as `-m finetune.train` would (its __init__ quiets optional back-ends)

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params

from . import checkpointing, conditioning, distributed, dry_run, embeddings, hub, lora, performance, prior, sharding
from .arguments import parse_args
from .cli import UserError, run
from .config import Config, TrainConfig, config_yaml, load_config
from .data import ImageTextStream, build_source, caption_texts
from .distributed import finish, make_accelerator, run_and_leave
from .encoding import BatchEncoder
from .export import draw_base, export, validate
from .families import check_size, text_conditioning
from .models import (
    Components,
    build_components,
    check_components,
    check_objective,
    frozen_dtype,
    load_components,
    place_models,
    sample_as_downstream,
    trainable,
    trained_in_full,
)
from .nonfinite import NonFiniteGuard
from .objective import (
    dataset_loss,
    diffusion_loss,
    mask_weights,
    min_snr_weights,
    on_device,
    perturb_noise,
    sample_noise_and_timesteps,
    training_target,
)
from .output_lock import OutputLock
from .preemption import StopOnSignal, shielded_workers
from .progress import StepLogger, print_summary, run_summary, tracker_settings
from .quantization import quantize_base

logger = get_logger("finetune")


def build_model(config: Config, source, accelerator: Accelerator) -> tuple[Components, list[torch.nn.Module]]:
    """The components (built from scratch, or loaded from `model.pretrained_model_name_or_path`) and the models
    that train: the UNet and, when they train, the text encoders, in full, with LoRA adapters or new tokens' rows.
    Frozen weights move to the device in the training precision; trainable ones stay float32."""
    if config.model.pretrained_model_name_or_path:
        components = load_components(config.model)
    else:
        components = build_components(config.model, config.data.resolution, caption_texts(config.data, source))
    check_objective(components.scheduler)
    check_size(components, config.data)
    check_components(components, config.model, config.train.export_single_file)
    ti = config.textual_inversion  # new tokens, their embedding rows trained (alone, or beside the LoRA)
    embeddings.add_tokens(components, ti)
    if config.lora.enabled or ti.enabled:
        sample_as_downstream(config.model, components)  # with the base's own scheduler, unchanged
    if config.lora.enabled:
        quantize_base(components, config.model.base_quantization, frozen_dtype(components, components.unet,
                      config.model, accelerator.mixed_precision), accelerator.device)  # (none: nothing)
        trained = lora.attach(components, config.lora, autocast=accelerator.mixed_precision != "no")
    else:
        trained = trained_in_full(components, config.model)
    trained = embeddings.train_rows(components, ti, trained, alone=not config.lora.enabled)
    if components.vae is not None:
        components.vae.requires_grad_(False)
    place_models(components, trained, config.lora.enabled or ti.enabled, config.model, accelerator.device,
                 accelerator.mixed_precision)  # frozen ones in the training precision; modes set
    cast_training_params(trained, dtype=torch.float32)  # also when the base was stored in half precision
    performance.speed_up(components.unet, [m for m in trained if m is not components.unet], config.train,
                         accelerator.device)
    return components, trained


def compute_loss(batch: dict, unet, encoder: BatchEncoder, scheduler, device: torch.device,
                 train: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward pass of the objective on a batch: encode images and text, noise, predict, regress. With
    data.sources (or a prior), each sample weighs as its dataset says, and the instance / regularisation losses
    come too."""
    samples, conditioning = encoder.samples(batch, device), encoder.conditioning(batch, device)
    noise, timesteps = sample_noise_and_timesteps(samples, scheduler.config.num_train_timesteps, train.noise_offset)
    noisy = scheduler.add_noise(samples, perturb_noise(noise, train.input_perturbation), timesteps)
    target = training_target(scheduler, samples, noise, timesteps)
    if encoder.prior is not None:  # DreamBooth's base_prediction: the batch again under the class prompt
        return encoder.prior.loss(batch, samples, noisy, timesteps, conditioning, target, unet, encoder, scheduler,
                                  train, device)
    model_pred = unet(noisy, timesteps, **conditioning, return_dict=False)[0]
    weights = min_snr_weights(scheduler, timesteps, train.snr_gamma) if train.snr_gamma else None
    pixel_weights = mask_weights(batch.get("mask"), samples, train.unmasked_weight, train.normalize_mask_area)
    if "loss_weight" in batch:
        return dataset_loss(model_pred, target, weights, pixel_weights, batch["loss_weight"], batch["regularisation"])
    return diffusion_loss(model_pred, target, weights, pixel_weights), None


def build_optimization(config: Config, params: list, accelerator: Accelerator):
    """The optimizer over `params` and the LR schedule."""
    train = config.train
    optimizer = performance.make_optimizer(params, train, accelerator.device)
    embeddings.keep_rows(optimizer, params, config.textual_inversion.until(train.max_train_steps))  # (new rows only)
    # accelerate steps a prepared LR scheduler once per process for every optimizer step.
    lr_scheduler = get_scheduler(train.lr_scheduler, optimizer,
                                 num_warmup_steps=train.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=train.max_train_steps * accelerator.num_processes)
    return optimizer, lr_scheduler


def build_ema(config: Config, trained: list, accelerator: Accelerator):
    """After accelerate's wrapping (FSDP puts its shards in place of the weights): the trained weights, and one EMA
    of those of each trained model (registered for checkpoints; with LoRA, checkpoints hold the adapters, not the
    frozen base), with the list of weights each EMA follows (listed once: walking the modules at every step took
    0.45 ms)."""
    models = [accelerator.unwrap_model(model) for model in trained]
    ema_weights = [trainable(model) for model in models] if config.train.use_ema else []
    emas = [EMAModel(weights, decay=config.train.ema_max_decay, use_ema_warmup=True,
                     foreach=not sharding.is_sharded(accelerator))  # (sharded tensors lack _foreach_copy_)
            for weights in ema_weights]
    for ema, weights in zip(emas, ema_weights):
        ema.to(weights[0].device)  # (FSDP's fsdp_offload_params keeps them on the CPU)
    checkpointing.EmaCheckpoints(accelerator, emas)  # safetensors, not accelerate's pickle
    if config.lora.enabled or config.textual_inversion.enabled:  # (their trainable weights only)
        lora.AdapterCheckpoints(accelerator)
    return [p for model in models for p in trainable(model)], emas, ema_weights


def build_data(config: Config, components: Components, source, accelerator: Accelerator, dry: bool = False):
    """This process's stream of training examples and its DataLoader. The epoch reaches the workers through
    shared memory, persistent or not; the loader has its own generator, so starting an epoch (or resuming
    mid-epoch) does not draw from the global RNG that the noise comes from. Captions that cannot teach a model to
    follow prompts are named first; with prior.mode: class_images the base's class images join the data."""
    tokenizers, data = components.tokenizers, config.data
    if accelerator.is_main_process:
        conditioning.check_captions(config.data, source, tokenizers[0])
    buckets, batch = config.data.buckets, config.train.train_batch_size
    if buckets and accelerator.num_processes > 1 and (config.prior.mode == "class_images"
                                                      or not getattr(source, "resampled", False)):
        raise UserError("data.buckets with several processes needs data.resampled: true (webdataset shards; not a mix "
                        "of data.sources, nor prior.mode: class_images): a finite epoch gives each process other "
                        "numbers of full buckets, and a process that runs out first would leave the others waiting")
    if config.prior.mode == "class_images":  # drawn now, while the weights are the base's (or found in the cache)
        source, data = prior.add_class_images(config.prior, data, components, source, accelerator,
                                              config.train.seed, dry)
    dataset = ImageTextStream(source, data, tokenizers, config.train.seed, accelerator.process_index,
                              accelerator.num_processes, batch_size=batch if buckets else None)
    workers = config.data.num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=None if buckets else batch, drop_last=not buckets,
                                         num_workers=workers, pin_memory=accelerator.device.type == "cuda",
                                         persistent_workers=config.data.persistent_workers and workers > 0,
                                         generator=torch.Generator().manual_seed(config.train.seed),
                                         **shielded_workers(workers))  # (a SIGTERM for the run is the loop's)
    return dataset, loader


def prepare(accelerator: Accelerator, config: Config, components: Components, trained: list, optimizer,
            lr_scheduler):
    """accelerate's wrapping of the trained models, optimizer and LR schedule (the components then hold the wrapped
    models); the training step's copy of the noise schedule, its tables on the device; the batch encoder."""
    sharding.keep_skeletons(accelerator, trained)  # FSDP: what validation and export gather the shards into
    names = [next(n for n in ("unet", "text_encoder", "text_encoder_2") if getattr(components, n) is m)
             for m in trained]  # (textual inversion alone trains the text encoders only)
    *trained, optimizer, lr_scheduler = distributed.prepare(accelerator, *trained, optimizer, lr_scheduler)
    for name, model in zip(names, trained):
        setattr(components, name, model)
    schedule = on_device(components.scheduler, accelerator.device)
    encoder = BatchEncoder(components.vae, text_conditioning(components), names != ["unet"], config.data.cache,
                           config.data.cache_dir)
    encoder.prior = prior.base_prediction(config.prior, components, accelerator)  # DreamBooth without images
    return trained, optimizer, lr_scheduler, schedule, encoder


def start_output(accelerator: Accelerator, config: Config) -> OutputLock | None:
    """Create output_dir, take its lock (one run per folder) and write the resolved config in it; with
    hub.push_to_hub, check the credentials now rather than after the training. The resume target is checked
    first, by every process: a missing one is reported before anything is built."""
    checkpointing.resume_target(config.train, accelerator.num_processes, sharding.is_sharded(accelerator))
    if not accelerator.is_main_process:
        return None
    Path(config.train.output_dir).mkdir(parents=True, exist_ok=True)
    lock = OutputLock(config.train.output_dir)
    (Path(config.train.output_dir) / "config.yaml").write_text(config_yaml(config))
    if config.hub.push_to_hub:
        hub.check_credentials(config.hub)
    return lock


def save_checkpoint(accelerator: Accelerator, config: Config, step: int, data_state: dict, resumed_from,
                    emas: list) -> None:
    """A resumable checkpoint of this step, also uploaded with hub.push_checkpoints (the training waits for the
    upload; a failed one is a warning, the checkpoint stays on disk)."""
    checkpointing.save_checkpoint(accelerator, config.train.output_dir, step, data_state,
                                  config.train.checkpoints_total_limit, resumed_from, config_yaml(config), emas)
    if config.hub.push_checkpoints and accelerator.is_main_process:
        try:
            hub.push_checkpoint(config.train.output_dir, step, config.hub)
        except hub.HubPushError as error:
            logger.warning(f"{error} Training goes on; checkpoint-{step} is on disk.")


def end_stopped(accelerator: Accelerator, stop: StopOnSignal, step: int, lock: OutputLock | None) -> None:
    """A preempted run's end: say how to continue from the checkpoint just written; let go of the output folder."""
    logger.info(f"stopped by signal {stop.signum or signal.SIGTERM} at step {step} after writing checkpoint-{step}; "
                "continue with train.resume_from_checkpoint=latest", main_process_only=True)
    finish(accelerator)
    if lock:
        lock.release()


def publish(config: Config, grid: Path, trained: str, num_processes: int, lock: OutputLock) -> None:
    """On the main process after the run: let go of the output folder, push with hub.push_to_hub, then the summary.
    A failed push keeps the output and says how to push it again; the run then exits with status 1."""
    lock.release()
    out, pushed, failure = config.train.output_dir, None, None
    if config.hub.push_to_hub:
        try:
            pushed = hub.push(out, config.hub, num_processes=num_processes).commit_url
        except hub.HubPushError as error:
            failure = f"{error}\nThe output is intact; push it later with: python -m finetune.hub {out}"
    print(run_summary(trained, out, grid, config.lora.enabled, pushed, config.validation.texts[0],
                      [embeddings.file_name(token) for token in config.textual_inversion.placeholder_tokens]))
    if failure:
        logger.error(failure)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    train = config.train
    if args.print_config:
        print(config_yaml(config), end="")
        return

    # Set up the accelerator and logging; seed; record the resolved config.
    accelerator = make_accelerator(config)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(train.seed)
    if not args.dry_run:
        lock = start_output(accelerator, config)
    elif not dry_run.check_ahead(config, accelerator):  # the base would be downloaded: not by a dry run
        return

    # Build the models (from scratch, or from a pretrained pipeline; in full or with LoRA) and the data.
    with accelerator.main_process_first():  # the built-in set is written once, by the main process
        source = build_source(config.data, train.seed)
    components, trained = build_model(config, source, accelerator)
    dataset, loader = build_data(config, components, source, accelerator, args.dry_run)
    set_seed(train.seed, device_specific=True)  # same initial weights everywhere, different noise per process

    # Build the optimizer, LR schedule and EMA over the trainable weights; frozen models are not wrapped.
    params = [p for model in trained for p in trainable(model)]
    optimizer, lr_scheduler = build_optimization(config, params, accelerator)
    print_summary(config, components, params, dataset.source, accelerator)
    if args.dry_run:
        return dry_run.read_one(dataset, accelerator)
    trained, optimizer, lr_scheduler, schedule, encoder = prepare(accelerator, config, components, trained, optimizer,
                                                                  lr_scheduler)
    params, emas, ema_weights = build_ema(config, trained, accelerator)

    # Resume: restore weights, optimizer, schedule, EMA and RNG, and skip the batches already seen.
    step, epoch, skip_batches, resumed_from = checkpointing.resume(accelerator, train, config_yaml(config), emas)
    draw_base(accelerator, config, components, emas, step)  # a fine-tune's first start: the base's own grid

    # Train.
    accelerator.init_trackers("finetune", config=tracker_settings(config))
    step_logger = StepLogger(accelerator, train, step)
    stop, stopped, grad_norm = StopOnSignal(), False, None  # stopped: all processes agreed and wrote the checkpoint
    guard = NonFiniteGuard(train.on_nonfinite, train.max_nonfinite_steps, train.logging_steps)
    while step < train.max_train_steps and not stopped:
        dataset.set_epoch(epoch)
        batches_in_epoch = skip_batches
        for batch in itertools.islice(loader, skip_batches, None):
            batches_in_epoch += 1
            with accelerator.accumulate(*trained):
                loss, groups = compute_loss(batch, components.unet, encoder, schedule, accelerator.device, train)
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # clip (max_norm inf: measure only), then refuse NaN/Inf
                    grad_norm = performance.clip_grad_norm(accelerator, params, train.max_grad_norm or math.inf)
                skip = accelerator.sync_gradients and guard.skip_step(accelerator, loss, grad_norm, step + 1,
                                                                      batch["key"])
                if not skip:
                    guard.step(optimizer)  # under fp16 the loss scaler may skip it
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if skip:
                continue
            step_logger.add(loss, groups)
            if not accelerator.sync_gradients:
                continue
            step += 1
            for ema, weights in zip(emas, ema_weights):
                ema.step(weights)
            save = train.checkpointing_steps and step % train.checkpointing_steps == 0
            sample = config.validation.validation_steps and step % config.validation.validation_steps == 0 \
                and step < train.max_train_steps  # the export samples the last step
            stopping = stop.requested(accelerator, step, train.logging_steps, force=save or sample)
            save, sample = save or stopping, sample and not stopping  # a stop saves at once, samples nothing
            guard.check(accelerator, step, force=save or sample or step >= train.max_train_steps)
            step_logger.step(step, step == train.max_train_steps, lr_scheduler.get_last_lr()[0], grad_norm)
            if save:
                save_checkpoint(accelerator, config, step, {"epoch": epoch, "batches_in_epoch": batches_in_epoch},
                                resumed_from, emas)
            if sample:
                validate(accelerator, config, components, emas, step, optimizer)
            if stopping:
                stopped = True
                break
            if step >= train.max_train_steps:
                break
        else:  # the epoch was read to the end (the workers too): count it
            step_logger.end_epoch(config, dataset, epoch, batches_in_epoch, step)
        if stopped:
            break
        epoch, skip_batches = epoch + 1, 0
    step_logger.progress.close()
    stop.close()
    if stopped:  # preempted: the checkpoint just written is the way back
        return end_stopped(accelerator, stop, step, lock)

    # Export: the pipeline (EMA weights when enabled) at output_dir and a final sample grid; then push, summarise.
    grid = export(accelerator, config, components, emas, step, optimizer)
    finish(accelerator)
    if accelerator.is_main_process:
        publish(config, grid, step_logger.summary(step), accelerator.num_processes, lock)


if __name__ == "__main__":
    # A user's mistake is one line and exit status 2; several processes exit without teardown (gloo can hang).
    run_and_leave(lambda: run(main))
