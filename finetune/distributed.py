"""The run's processes: the Accelerator that sets them up (DDP, or FSDP through `sharding`), and the checks and
endings that every process of a multi-process run takes part in."""

import hashlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration

from . import performance, sharding
from .cli import UserError
from .config import Config
from .progress import tracker_names

logger = get_logger("finetune")


def make_accelerator(run: Config) -> Accelerator:
    """An Accelerator for this run; on CPU, also the thread count and a refusal of fp16; under FSDP, a refusal of
    what the sharded path does not do."""
    config = run.train
    accelerator = Accelerator(
        mixed_precision=performance.resolve_precision(config.mixed_precision),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=tracker_names(config.report_to),
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"),
    )
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched > accelerator.num_processes:  # each process would train alone, all into one output folder
        raise UserError(f"the launcher started {launched} processes (WORLD_SIZE) but accelerate set this one up as "
                        f"{accelerator.num_processes} ({accelerator.distributed_type.value}): check the accelerate "
                        "config's distributed_type (on CPU, several processes need MULTI_CPU: ACCELERATE_USE_CPU=1 "
                        "accelerate launch --multi_gpu --num_processes N)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED or _asked_for("DEEPSPEED"):
        raise UserError("the accelerate config asks for DeepSpeed, which this trainer does not run: its checkpoints "
                        "are pickles that DeepSpeed loads unrestricted; shard with FSDP2 (distributed_type: FSDP, "
                        "fsdp_version: 2: configs/accelerate/fsdp.yaml), or use DDP (--multi_gpu)")
    if _asked_for("FSDP") and accelerator.num_processes > 1 and not sharding.is_sharded(accelerator):
        raise UserError(f"the accelerate config asks for FSDP but accelerate set this run up as "
                        f"{accelerator.distributed_type.value}, unsharded (accelerate runs FSDP on GPUs only); on CPU "
                        "use DDP: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N")
    sharding.check(accelerator, config, run.model, run.lora.enabled and run.lora.train_text_encoder)
    if sharding.is_sharded(accelerator) and run.textual_inversion.enabled:
        raise UserError("textual_inversion.placeholder_tokens: under FSDP accelerate shards one trained model, the "
                        "UNet, and textual inversion trains the text encoders' rows; train it with DDP "
                        "(distributed_type: MULTI_GPU) or on one process")
    performance.configure_backends(config, accelerator.device)
    if accelerator.device.type == "cpu":
        if config.mixed_precision == "fp16":
            raise UserError("train.mixed_precision=fp16 needs a GPU; on CPU use no (fp32), or bf16 where the CPU has "
                            "AMX (without it bf16 is slower than fp32), or auto to choose")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        here = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.state.num_processes))  # (this machine's share)
        torch.set_num_threads(config.cpu_threads or max(1, cores // here))
    return accelerator


def _asked_for(engine: str) -> bool:
    """Whether `accelerate launch` was told to use `engine` (it says so in ACCELERATE_USE_<ENGINE>), though on a CPU
    it sets the run up without it."""
    return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"


def weight_digests(models: list[torch.nn.Module]) -> tuple[list[str], torch.Tensor]:
    """The name and SHA-256 digest (32 uint8 values) of every trained weight of `models` (those that require a
    gradient: the whole model when it trains in full, its adapters with LoRA), in a fixed order. Any changed bit
    changes a digest, a swap of two elements too."""
    names, digests = [], []
    for model in models:
        for name, param in model.named_parameters():
            if param.requires_grad:
                data = param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                names.append(f"{type(model).__name__}.{name}")
                digests.append(torch.tensor(list(hashlib.sha256(data).digest()), dtype=torch.uint8))
    return names, torch.stack(digests)


def check_in_sync(accelerator: Accelerator, models: list[torch.nn.Module]) -> None:
    """Every process must hold the same trained weights (DDP averages gradients); a mismatch means the processes
    did not really train together. The processes compare the digest of each trained tensor of `models`; the first
    tensor that differs is named."""
    if accelerator.num_processes == 1:
        return
    if accelerator.distributed_type == DistributedType.FSDP:  # each process holds its own shard of each weight
        logger.info("weights sharded (FSDP): each process holds its own shard", main_process_only=True)
        return
    names, digests = weight_digests([accelerator.unwrap_model(model, keep_torch_compile=False) for model in models])
    gathered = accelerator.gather(digests.to(accelerator.device)).cpu().reshape(accelerator.num_processes,
                                                                                 *digests.shape)
    differs = (gathered != gathered[0]).any(dim=-1)  # (process, tensor)
    if differs.any():
        index = int(differs.any(dim=0).nonzero()[0])
        processes = differs[:, index].nonzero().flatten().tolist()
        raise RuntimeError(f"the {accelerator.num_processes} processes ended with different weights: {names[index]} "
                           f"on process(es) {processes} differs from process 0 (SHA-256 of each trained tensor "
                           "compared); their gradients were not synchronised")
    logger.info(f"weights identical on all {accelerator.num_processes} processes ({len(names)} trained tensors, "
                "compared by SHA-256)", main_process_only=True)


# Runs of several processes: each Accelerator that `prepare` wrapped models for, with the models as it returned them
# (accelerate's own list keeps the modules inside DDP's wrappers, not the wrappers, which alone hold DDP's reducer and
# through it gloo's process group), kept alive until `run_and_leave` exits; and those that `finish`ed.
_HELD: list[tuple[Accelerator, list[torch.nn.Module]]] = []
_FINISHED: list[Accelerator] = []


def prepare(accelerator: Accelerator, *objects: Any) -> Any:
    """`accelerator.prepare(*objects)`; for a run of several processes, its Accelerator and the wrapped models are
    kept for `run_and_leave`."""
    prepared = accelerator.prepare(*objects)
    if accelerator.num_processes > 1:
        returned = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
        _HELD.append((accelerator, [o for o in returned if isinstance(o, torch.nn.Module)]))
    return prepared


def finish(accelerator: Accelerator) -> None:
    """End the run on every process together: a barrier, then the trackers and the process group. A run of
    several processes keeps its Accelerator for `run_and_leave`."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        _HELD.append((accelerator, []))
        _FINISHED.append(accelerator)


def run_and_leave(run: Callable[[], Any]) -> None:
    """`run()`; then, once it has wrapped the models of a run of several processes (`prepare`) or ended one
    (`finish`), exit at once with its status, without Python's teardown: when it returns, and when it raises (a
    failed push to the Hub, a damaged checkpoint found on resume, a non-finite loss with `on_nonfinite: error`: the
    traceback or message is printed first, and a run that did not reach `finish` has its trackers finished).

    destroy_process_group shuts the backends down and drops the registry's reference, but DDP's reducer still holds
    gloo's process group, and freeing the last reference (when `main` returns, or at interpreter exit) joins gloo's
    worker thread with the GIL held. When that thread is still freeing the last collective's work, which holds
    Python tensors, it waits for the GIL: both wait for ever (2 launches in 12 of a two-process loop, torch 2.13; see
    pytorch/pytorch#56297 and #190489). `prepare` keeps DDP's wrappers alive (accelerate keeps only the modules
    inside them), so neither happens before this exits. Files are written and closed by then; the output is
    flushed here."""
    try:
        run()
    except SystemExit as error:
        code = error.code
        if _HELD and not isinstance(code, int) and code is not None:
            print(code, file=sys.stderr)  # what Python prints for sys.exit("text")
        _leave(code if isinstance(code, int) else int(code is not None))
        raise
    except BaseException:
        if _HELD:
            traceback.print_exc()
        _leave(1)
        raise
    _leave(0)


def _leave(status: int) -> None:
    if not _HELD:
        return
    for accelerator, _ in _HELD:
        if not any(accelerator is done for done in _FINISHED):  # (raised before `finish`): the trackers' last values
            for tracker in accelerator.trackers:
                try:
                    tracker.finish()
                except Exception as error:  # noqa: BLE001 - leaving anyway; say why a tracker may lack its end
                    print(f"could not finish the {tracker.name} tracker: {error}", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
