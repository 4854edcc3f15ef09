"""FSDP (accelerate's FSDP2, `fsdp_version: 2` in the accelerate config): what the trainer does differently when
the trained models are sharded over the processes.

- **Whole weights for sampling and export.** Each process holds a shard of every trained weight. Before sharding,
  the main process keeps a skeleton of each trained model (its modules with weights on the meta device: no
  memory); validation and the export gather the full state dict onto the main process's CPU (every process takes
  part) and load it into the skeleton, which then samples and saves as an unsharded model would. The EMA is sharded
  like the weights it follows and swapped in before the gather.
- **Sharded checkpoints, safetensors only.** torch's distributed checkpoint (what accelerate's `save_state` writes
  under FSDP) keeps its metadata in a pickle that loading unpickles unrestricted; here each process writes its own
  shard of the trained weights, of the optimizer state and of the EMA as `shard-<rank>.<part>.safetensors`, in
  parallel, plus the LR schedule as JSON. Shards are torch.chunk slices along the first dimension (FSDP2's
  `Shard(0)`), so `stitch` rebuilds a whole tensor offline by concatenating them in rank order. A checkpoint
  resumes on as many processes as wrote it (the manifest checks).
"""

import copy
import json
import weakref
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend
from safetensors import safe_open
from safetensors.torch import save_file

from .cli import UserError
from .config import ModelConfig, TrainConfig

SHARD = "shard-{rank}.{part}.safetensors"
SCHEDULER = "scheduler.json"
OPTIMIZERS = ("adamw", "sgd")  # those whose state is per-weight tensors shaped like the weight (and a step count)
_skeletons: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check(accelerator: Accelerator, train: TrainConfig, model: ModelConfig, lora_text_encoder: bool) -> None:
    """Refuse, before anything is built, what the sharded path does not do."""
    if not is_sharded(accelerator):
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise UserError(f"accelerate is set up for FSDP version {plugin.fsdp_version}; this trainer shards with FSDP2: "
                        "set fsdp_version: 2 in the accelerate config's fsdp_config (or --fsdp_version 2)")
    problems = []
    if model.train_text_encoder or lora_text_encoder:  # accelerate's FSDP2 prepares one model
        problems.append(f"{'model' if model.train_text_encoder else 'lora'}.train_text_encoder=true (accelerate "
                        "shards one trained model with FSDP2: the UNet; set it to false)")
    if train.use_8bit_adam:
        problems.append("train.use_8bit_adam=true (its quantized state is not shaped like the weights it shards)")
    elif train.optimizer not in OPTIMIZERS:
        problems.append(f"train.optimizer={train.optimizer} (sharded checkpoints hold {' or '.join(OPTIMIZERS)} state)")
    if train.optimizer_cpu_offload:
        problems.append("train.optimizer_cpu_offload=true (use the accelerate config's fsdp_offload_params instead)")
    if accelerator.mixed_precision == "fp16":
        problems.append(f"train.mixed_precision={train.mixed_precision}, which is fp16 here (use bf16, or no)")
    if model.base_quantization != "none":
        problems.append(f"model.base_quantization={model.base_quantization} (quantized weights are not sharded)")
    if train.compile or accelerator.state.dynamo_plugin.backend != DynamoBackend.NO:
        problems.append("train.compile or the accelerate config's dynamo_backend (compiling a sharded UNet is not "
                        "tested here yet; set dynamo_backend: 'no' and train.compile: false)")
    if plugin.activation_checkpointing:
        problems.append("the accelerate config's fsdp_activation_checkpointing (its wrappers rename every weight; use "
                        "train.gradient_checkpointing instead)")
    if problems:
        raise UserError(f"under FSDP this trainer does not support {'; '.join(problems)}; change these, or train with "
                        "DDP (distributed_type: MULTI_GPU)")


def keep_skeletons(accelerator: Accelerator, models: list[torch.nn.Module]) -> None:
    """Before sharding: on the main process, a copy of each model whose parameters are on the meta device (the
    copy costs no weight memory; its buffers, small, are real), to be filled by `whole`."""
    if not is_sharded(accelerator) or not accelerator.is_main_process:
        return
    for model in models:
        memo = {id(p): _on_meta(p) for p in model.parameters()}
        _skeletons[model] = copy.deepcopy(model, memo)


def _on_meta(param: torch.nn.Parameter) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)


def whole(accelerator: Accelerator, models: list[torch.nn.Module]) -> list[torch.nn.Module | None]:
    """`models` as whole, unsharded models: under FSDP, every process takes part in gathering the full state dicts
    and the main process gets its skeletons filled with them, on the device (the others get None); otherwise the
    models themselves (and a model that is not sharded, a frozen one, is itself everywhere). `release` empties the
    skeletons again."""
    if not is_sharded(accelerator):
        return models
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered onto the main process's CPU only
    result = []
    for model in models:
        if not isinstance(model, FSDPModule):  # a frozen model: whole on every process
            result.append(model)
            continue
        state = get_model_state_dict(model, options=options)
        if not accelerator.is_main_process:
            result.append(None)
            continue
        skeleton = _skeletons[model]
        skeleton.load_state_dict(state, assign=True)
        result.append(skeleton.to(accelerator.device).train(model.training))
    return result


def release(accelerator: Accelerator, models: list[torch.nn.Module | None]) -> None:
    """Give back the memory `whole` filled the skeletons with (they stay usable for the next gather)."""
    if is_sharded(accelerator) and accelerator.is_main_process:
        for model in models:
            if any(model is skeleton for skeleton in _skeletons.values()):
                for module in model.modules():  # the weights only: buffers the state dict lacks must stay
                    for name, param in list(module.named_parameters(recurse=False)):
                        setattr(module, name, _on_meta(param))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _saved(tensor: torch.Tensor) -> torch.Tensor:
    return _local(tensor).detach().cpu().clone().contiguous()  # its own memory: safetensors refuses shared storage


def _write(folder: Path, rank: int, part: str, tensors: dict, metadata: dict) -> None:
    """`tensors` (this process's shards) with `metadata` and the whole shapes of the tensors in `metadata["whole"]`,
    all under one metadata key: safetensors orders several keys differently from one write to the next."""
    shapes = {key: list(value.shape) for key, value in metadata.pop("whole", {}).items()}
    save_file(tensors, str(folder / SHARD.format(rank=rank, part=part)),
              metadata={"state": json.dumps({**metadata, "shapes": shapes})})


def _read(folder: Path, rank: int, part: str) -> tuple[dict, dict]:
    path = folder / SHARD.format(rank=rank, part=part)
    if not path.is_file():
        raise UserError(f"checkpoint {folder} has no {path.name}: it was not written by this sharded run's "
                        "processes; resume from another checkpoint")
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, json.loads(f.metadata()["state"])


def _fill(target: torch.Tensor, saved: torch.Tensor, what: str) -> None:
    local = _local(target)
    if local.shape != saved.shape:
        raise UserError(f"{what}: the checkpoint's shard is {tuple(saved.shape)} but this run's is "
                        f"{tuple(local.shape)} (other model or lora settings, or another number of processes)")
    with torch.no_grad():
        local.copy_(saved)


def save_state(accelerator: Accelerator, folder: Path, emas: list) -> None:
    """Every process writes its shards of the trained weights (those that require a gradient: with LoRA the adapters;
    the frozen base comes from the base on resume), of the optimizer state and of each EMA; the main process the LR
    schedule."""
    rank = accelerator.process_index
    for i, model in enumerate(accelerator._models):
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        _write(folder, rank, f"model_{i}", {name: _saved(p) for name, p in trained.items()}, {"whole": trained})
    for i, ema in enumerate(emas):
        state = ema.state_dict()
        shadows = {f"shadow.{j}": p for j, p in enumerate(state.pop("shadow_params"))}
        _write(folder, rank, f"ema_{i}", {k: _saved(p) for k, p in shadows.items()}, {"state": state, "whole": shadows})
    (optimizer,) = accelerator._optimizers
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value for index, entry in state["state"].items() for key, value in entry.items()
               if torch.is_tensor(value)}
    plain = {f"{index}.{key}": value for index, entry in state["state"].items() for key, value in entry.items()
             if not torch.is_tensor(value)}
    _write(folder, rank, "optimizer", {k: _saved(v) for k, v in tensors.items()},
           {"param_groups": state["param_groups"], "plain": plain, "whole": tensors})
    if accelerator.is_main_process:
        (scheduler,) = accelerator._schedulers
        (folder / SCHEDULER).write_text(json.dumps(scheduler.state_dict()))


def load_state(accelerator: Accelerator, folder: Path, emas: list) -> None:
    """Put back what `save_state` wrote, each process its own shards."""
    from torch.distributed.tensor import DTensor

    rank = accelerator.process_index
    for i, model in enumerate(accelerator._models):
        tensors, _ = _read(folder, rank, f"model_{i}")
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if set(tensors) != set(trained):
            raise UserError(f"checkpoint {folder} does not hold this run's trained weights of model {i} "
                            f"({len(set(tensors) ^ set(trained))} differ: other lora.* or model settings?)")
        for name, param in trained.items():
            _fill(param, tensors[name], f"checkpoint {folder}, model {i}, {name}")
    for i, ema in enumerate(emas):
        if not (folder / SHARD.format(rank=rank, part=f"ema_{i}")).is_file():
            raise UserError(f"checkpoint {folder} holds no EMA (its run had train.use_ema: false); resume with "
                            "train.use_ema: false, or start afresh")
        tensors, metadata = _read(folder, rank, f"ema_{i}")
        for j, shadow in enumerate(ema.shadow_params):
            _fill(shadow, tensors[f"shadow.{j}"], f"checkpoint {folder}, EMA {i}, weight {j}")
        ema.load_state_dict({**metadata["state"], "shadow_params": ema.shadow_params})
    (optimizer,) = accelerator._optimizers
    tensors, metadata = _read(folder, rank, "optimizer")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *metadata["plain"].items()]:
        index, name = key.split(".", 1)
        param = params[int(index)]
        if isinstance(param, DTensor) and torch.is_tensor(value) and value.dim() > 0:  # shaped like its weight
            value = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements, run_check=False,
                                       shape=param.shape, stride=param.stride())
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": metadata["param_groups"]})
    (scheduler,) = accelerator._schedulers
    scheduler.load_state_dict(json.loads((folder / SCHEDULER).read_text()))


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / SHARD.format(rank=0, part="model_0")).is_file()


def stitch(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """The whole tensors of one part (`model_0`, `ema_0`, ...) of a sharded checkpoint, offline: each process's
    slices concatenated in rank order, checked against the whole shapes the main process recorded."""
    ranks = sorted(int(p.name.split(".")[0].removeprefix("shard-")) for p in folder.glob(f"shard-*.{part}.safetensors"))
    if ranks != list(range(len(ranks))):
        raise UserError(f"checkpoint {folder}: the shards of {part} are incomplete (ranks {ranks})")
    shards = [_read(folder, rank, part) for rank in ranks]
    shapes = shards[0][1]["shapes"]
    stitched = {}
    for key, shape in shapes.items():
        pieces = [tensors[key] for tensors, _ in shards]
        stitched[key] = pieces[0] if list(pieces[0].shape) == shape else torch.cat(pieces)
        if list(stitched[key].shape) != shape:
            raise UserError(f"checkpoint {folder}: the shards of {part}.{key} make {tuple(stitched[key].shape)}, not "
                            f"{tuple(shape)}")
    return stitched
