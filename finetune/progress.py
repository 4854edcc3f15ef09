"""What a run shows: the start-up summary, the progress bar, the periodic loss / LR / gradient-norm / images/s
logs sent to the trackers (and appended to `<output_dir>/metrics.jsonl`, which `finetune.ui` reads), and the
end-of-run summary."""

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from tqdm.auto import tqdm

from .config import Config, DataConfig, TrainConfig
from .data.transforms import bucket_sizes
from .models import Components, count_parameters

logger = get_logger("finetune")


def tracker_names(report_to: str) -> list[str]:
    """accelerate's `log_with` for `train.report_to`; a named tracker that is not installed is an error
    (accelerate would drop it silently)."""
    names = [name.strip() for name in report_to.split(",")]
    if "none" in names:
        return []
    if "all" in names:
        return ["all"]
    available = {str(tracker) for tracker in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        raise ValueError(f"train.report_to: {', '.join(missing)} is not installed; `pip install {' '.join(missing)}`, "
                         "or choose another tracker (tensorboard comes with this project)")
    return names


# A config field or URL query parameter named like a credential (`hub_token`, `api_key`, `X-Amz-Signature`; not
# `max_caption_tokens`).
SECRET_NAME = re.compile(r"(^|[_-])(access[_-]?)?(token|key|api[_-]?key|secret|password|passwd|credentials?|"
                         r"signature|sig|auth)$", re.IGNORECASE)


def tracker_settings(config: Config) -> dict:
    """The resolved config flattened to `section.key` scalars, as trackers take hyperparameters, without what should
    not leave this machine: fields named like a credential are left out, and the paths are reduced by
    `public_location` (a Hub id or a remote URL stays, without its credentials)."""
    paths = {"train.output_dir": False, "train.resume_from_checkpoint": False, "data.path": config.data.source == "hf",
             "model.pretrained_model_name_or_path": True,
             "model.pretrained_vae_model_name_or_path": True,  # the fields that hold paths; true: or a Hub id
             "validation.loss_data.path": config.validation.loss_data.get("source", config.data.source) == "hf"}
    flat = {}
    for section, values in dataclasses.asdict(config).items():
        for key, value in values.items():
            if key == "sources" and value:  # data.sources.<i>.<key>, its paths reduced as data.path is
                value = {f"{i}.{k}": ("::".join(public_location(part, entry.get("source") == "hf")
                                                 for part in str(v).split("::")) if k == "path" and v else v)
                         for i, entry in enumerate(value) for k, v in entry.items() if not SECRET_NAME.search(str(k))}
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, item in items:
                name = f"{section}.{key}" + (f".{sub}" if sub else "")
                if SECRET_NAME.search(sub or key):
                    continue
                if name in paths and item:  # (`::` joins webdataset patterns)
                    item = "::".join(public_location(part, paths[name]) for part in item.split("::"))
                flat[name] = item if isinstance(item, (int, float, str, bool)) else str(item)
    return flat


def public_location(location: str, may_be_hub_id: bool) -> str:
    """A path or URL as trackers may see it: a local path (or `file:` URL) reduced to its last part; a remote URL
    without a `user:password@` and with the values of credential-named query parameters redacted; a `pipe:` command
    (which may carry credentials anywhere) redacted. When `may_be_hub_id`, a name that is no local path (a Hub id)
    stays as it is."""
    url = urlsplit(location)
    if url.scheme == "pipe":
        return "pipe:REDACTED"
    if len(url.scheme) > 1 and url.scheme != "file":  # (a one-letter scheme is a Windows drive)
        params = [param.partition("=") for param in url.query.split("&")] if url.query else []
        query = "&".join(k + ("=REDACTED" if SECRET_NAME.search(k) else sep + v) for k, sep, v in params)
        return urlunsplit((url.scheme, url.netloc.rpartition("@")[2], url.path, query, url.fragment))
    path = Path(url.path if url.scheme == "file" else location).expanduser()
    hub_like = location.count("/") <= 1 and not location.startswith(("/", ".", "~"))  # (a missing local path is
    return location if may_be_hub_id and hub_like and not path.exists() else path.name  # still a path)


METRICS_FILE = "metrics.jsonl"


class StepLogger:
    """Accumulates the loss on the device and logs loss, LR, gradient norm, step time and images/s every
    `train.logging_steps` steps (the only host syncs between them), from `step` (where the run starts or
    resumes) to `train.max_train_steps`.

    The main process also appends what it logs to `<output_dir>/metrics.jsonl`, one JSON object a line, so a
    reader needs no tracker and no server (`finetune.ui` draws its live view from it): `{"event": "start", "step",
    "max_steps"}` when training starts or resumes, `{"step", "max_steps", "loss", "lr", "grad_norm", "step_time",
    "images_per_s"}` every logging step (with data.sources also `loss_instance` and `loss_regularisation`),
    `{"step", "data": {...}}` after each epoch (the data counts), and
    `{"event": "end", "step"}` when a run finishes (not when it is stopped); every line has its wall-clock `time`.
    A resumed run appends to the same file, so steps may repeat: the latest line of a step is the one that counts."""

    def __init__(self, accelerator: Accelerator, train: TrainConfig, step: int):
        self.progress = tqdm(total=train.max_train_steps, initial=step, disable=not accelerator.is_main_process,
                             desc="train", unit="step")
        self.accelerator, self.every, self.max_steps = accelerator, train.logging_steps, train.max_train_steps
        # the images one optimizer step trains on, over all processes
        self.samples_per_step = train.train_batch_size * train.gradient_accumulation_steps * accelerator.num_processes
        self.loss_sum, self.count = torch.zeros((), device=accelerator.device), 0
        self.group_sums = None  # with data.sources: `objective.dataset_loss`'s sums and counts since the last log
        self.start, self.start_step = time.perf_counter(), step
        self.run_start, self.first_step = self.start, step
        self.metrics = Path(train.output_dir) / METRICS_FILE if accelerator.is_main_process else None
        self.record({"event": "start", "step": step, "max_steps": self.max_steps})

    def add(self, loss: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """One micro-batch's loss, and with data.sources its instance / regularisation sums and counts."""
        self.loss_sum += loss.detach()
        self.count += 1
        if groups is not None:
            self.group_sums = groups if self.group_sums is None else self.group_sums + groups

    def step(self, step: int, last: bool, lr: float, grad_norm) -> None:
        self.progress.update(1)
        if step % self.every and not last:
            return
        # The mean over all processes, as diffusers' scripts log it (each process's mean covers as many steps).
        loss = self.accelerator.reduce(self.loss_sum / self.count, reduction="mean").item()
        grad_norm = float(grad_norm)  # (both wait for the steps to finish)
        # Windows follow each other without a gap: each counts the wait above and the previous window's logging.
        now = time.perf_counter()
        step_time = (now - self.start) / (step - self.start_step)
        logs = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time": step_time,
                "images_per_s": self.samples_per_step / step_time, **self.group_losses()}
        self.accelerator.log(logs, step=step)
        self.record({"step": step, "max_steps": self.max_steps, **logs})
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{logs['images_per_s']:.1f}")
        self.loss_sum.zero_()
        self.count, self.start, self.start_step = 0, now, step

    def group_losses(self) -> dict:
        """loss_instance and loss_regularisation since the last log, over all processes (the mean of their
        samples' losses, before the dataset weights); a group with no sample in the window is left out. With
        data.sources only; every process takes part (a collective)."""
        if self.group_sums is None:
            return {}
        sums = self.accelerator.reduce(self.group_sums, reduction="sum").tolist()
        self.group_sums = None
        return {name: total / count for name, total, count in
                (("loss_instance", *sums[:2]), ("loss_regularisation", *sums[2:])) if count}

    def end_epoch(self, config: Config, dataset, epoch: int, batches: int, step: int) -> None:
        """After an epoch read to the end: its data counts (used, dropped by each filter, skipped by reason; all
        epochs so far, the dataloader workers' included) to the log and the trackers. An epoch without a single
        batch is an error."""
        counts = dataset.collect_counts(config.data.num_workers)
        if batches == 0:
            raise RuntimeError(f"an epoch of {'the mixed' if config.data.sources else config.data.source} data gave "
                               f"no full batch of "
                               f"{config.train.train_batch_size} samples ({dict(counts)}); check data.path and "
                               "data.filters, or lower train.train_batch_size")
        logger.info(f"epoch {epoch + 1} data (all epochs so far): {dict(counts)}", main_process_only=True)
        self.accelerator.log({f"data/{name}": value for name, value in counts.items()}, step=step)
        self.record({"step": step, "data": dict(counts)})

    def summary(self, step: int) -> str:
        """Steps, wall time and images/s of this run (since it started or resumed); asked for once a run has
        finished, so the end is recorded in metrics.jsonl here."""
        self.record({"event": "end", "step": step})
        seconds, steps = time.perf_counter() - self.run_start, step - self.first_step
        minutes, rest = divmod(round(seconds), 60)
        rate = f", {steps * self.samples_per_step / seconds:.1f} images/s" if steps else ""
        resumed = f" (resumed at step {self.first_step})" if self.first_step else ""
        device = self.accelerator.device
        memory = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                  if device.type == "cuda" else "")
        return f"trained {steps} steps{resumed} in {minutes}:{rest:02d}{rate}{memory}; at step {step}"

    def record(self, entry: dict) -> None:
        """Append `entry` and the time to metrics.jsonl (main process only). The line goes out in one `write` to a
        file opened for appending, so a reader sees whole lines only, never half of one; a value that is not
        finite is written as null (JSON has no NaN)."""
        if self.metrics is None:
            return
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}
        line = json.dumps({**values, "time": round(time.time(), 3)}) + "\n"
        fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def run_summary(trained: str, output: str, grid, lora: bool, pushed: str | None, prompt: str,
                embedding_files: list[str] = ()) -> str:
    """The end-of-run summary: what was trained, where the outputs are, and the commands that come next."""
    kind = "LoRA adapters: pytorch_lora_weights.safetensors" if lora else \
        "textual inversion" if embedding_files else "pipeline (diffusers folder)"
    kind += "".join(f", {name}" for name in embedding_files)
    push = f"pushed: {pushed}" if pushed else f"push:     python -m finetune.hub {output} --hub-model-id <you>/<name>"
    if embedding_files and not pushed:
        push = f"share:    hf upload <you>/<name> {output}  (the model card does not describe embeddings yet)"
    return "\n".join([
        trained,
        f"output:   {output}  ({kind}, config.yaml)",
        f"samples:  {grid}",
        f"logs:     tensorboard --logdir {output}/logs",
        f"sample:   python -m finetune.sample {output} \"{prompt}\"",
        f"evaluate: python -m finetune.evaluate {output}",
        push,
    ])


def print_summary(config: Config, components: Components, params, source, accelerator: Accelerator) -> None:
    if accelerator.is_main_process:
        print(describe(config, components, params, source, accelerator))


def bucket_line(data: DataConfig) -> str:
    """With data.buckets, the buckets (width x height), as the start-up summary names them."""
    if not data.buckets:
        return ""
    sizes = data.bucket_sizes or bucket_sizes(data.resolution, data.bucket_step)
    return f" in {len(sizes)} aspect-ratio buckets ({', '.join(f'{w}x{h}' for w, h in sizes)})"


def data_line(data: DataConfig, source, size) -> str:
    """What the data is: its source and size, or with data.sources each dataset's share of an epoch."""
    if not hasattr(source, "describe"):  # (a mix of data.sources, or the data with prior's class images)
        return f"{data.source} ({size} samples)"
    return (f"{len(source.entries)} datasets, {size} samples an epoch (before filters):\n{source.describe()}\n "
            " all")


def describe(config: Config, components: Components, params, source, accelerator: Accelerator) -> str:
    text = sum(count_parameters(encoder) for encoder in components.text_encoders)
    total = count_parameters(components.unet) + text
    trainable = sum(p.numel() for p in params)
    size = source.num_samples or "streaming"
    encoders = "text encoders" if components.text_encoder_2 else "text encoder"
    adapters = (f"LoRA rank {config.lora.rank} on {', '.join(config.lora.target_modules)}"
                + (f" and the {encoders} (rank {config.lora.text_encoder_rank})" if config.lora.train_text_encoder
                   else "") + "; ") if config.lora.enabled else ""
    space = (f"latent space ({components.vae.config.latent_channels}-channel VAE latents)"
             if components.vae is not None else "pixel space") + (", SDXL" if components.text_encoder_2 else "")
    batch = config.train.train_batch_size * config.train.gradient_accumulation_steps * accelerator.num_processes
    return (
        f"unet {count_parameters(components.unet):,} params, {encoders} {text:,}; {adapters}trainable {trainable:,} "
        f"({trainable / total:.1%}; "
        f"UNet {count_parameters(components.unet, trainable_only=True) / count_parameters(components.unet):.1%}), "
        f"{space}\n"
        f"data: {data_line(config.data, source, size)} at {config.data.resolution}px{bucket_line(config.data)}, "
        f"vocabulary {len(components.tokenizer)} tokens\n"
        f"{config.train.max_train_steps} steps x {batch} samples (per process {config.train.train_batch_size}, "
        f"accumulation {config.train.gradient_accumulation_steps}, {accelerator.num_processes} processes) on "
        f"{accelerator.device} ({accelerator.distributed_type.value}), precision {accelerator.mixed_precision}, "
        f"{torch.get_num_threads()} threads\n"
        f"output: {config.train.output_dir}"
    )
