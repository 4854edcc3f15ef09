"""Speed and memory levers (`train.*`): the precision `auto` picks, TF32, gradient checkpointing, xformers
attention, `torch.compile`, and the optimizer (AdamW, or bitsandbytes' 8-bit AdamW). The GPU-only ones refuse
with a clear message on a CPU; what each buys is measured in benchmarks/README.md. Also the step's clipping and
optimizer step without accelerate's per-call host costs where its wrappers add nothing else."""

import contextlib
import importlib
import logging
import math
import re
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from .cli import UserError
from .config import TrainConfig

logger = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 faster than in fp32: a CUDA GPU that supports bf16 (Ampere and later), or
    a CPU with AMX tiles. AVX-512 BF16 alone does not pay: on this project's CPU (avx512_bf16, no AMX, torch 2.13)
    a 2048x2048 bf16 matmul runs at 165 GFLOP/s against 322 in fp32 (benchmarks/README.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        cpuinfo = Path("/proc/cpuinfo")
        return cpuinfo.is_file() and "amx_bf16" in cpuinfo.read_text()
    return False


def resolve_precision(mixed_precision: str) -> str:
    """accelerate's mixed precision for `train.mixed_precision`: `auto` is bf16 where the device has it natively,
    else no (fp32); the other values pass through."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if native_bf16(PartialState().device) else "no"


def configure_backends(train: TrainConfig, device: torch.device) -> None:
    """TF32 matmuls on CUDA with `train.allow_tf32` (fp32 matmuls on Ampere and later GPUs run on the tensor cores
    with a 10-bit mantissa; cuDNN convolutions already do by PyTorch's default); nothing to do on a CPU."""
    if train.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif train.allow_tf32:
        logger.info("train.allow_tf32: no effect on %s (TF32 is a CUDA GPU feature)", device)


def speed_up(unet: torch.nn.Module, text_encoders: list[torch.nn.Module], train: TrainConfig,
             device: torch.device) -> None:
    """Apply the model-side levers before training: gradient checkpointing (to the text encoders that train too),
    xformers attention, and `torch.compile` of the UNet (in place, so the module, its state dict and its saving
    stay as they are)."""
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for text_encoder in text_encoders:  # (transformers 5 renamed it; older releases have the first name only)
            getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)()
    if train.enable_xformers_memory_efficient_attention:
        if device.type != "cuda":
            raise ValueError("train.enable_xformers_memory_efficient_attention needs a CUDA GPU (xformers has no CPU "
                             f"kernels; this run is on {device}); set it to false: PyTorch's SDPA attention is used "
                             "by default")
        try:
            import xformers  # noqa: F401
        except ImportError as error:
            raise ValueError("train.enable_xformers_memory_efficient_attention: xformers is not installed; "
                             "`pip install xformers` (a build matching your torch), or set it to false (PyTorch's "
                             "SDPA attention is used by default)") from error
        unet.enable_xformers_memory_efficient_attention()
    if train.compile:
        unet.compile()


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig, device: torch.device):
    """The optimizer of `train.optimizer` over `params`, with `train.optimizer_args`: PyTorch's fused AdamW (the
    default), SGD or Adafactor; bitsandbytes' 8-bit AdamW (`adamw_8bit` or `train.use_8bit_adam`: its moments take
    a quarter of the memory); prodigyopt's Prodigy; schedulefree's AdamW, put in train mode (and given the warm-up)."""
    name = "adamw_8bit" if train.use_8bit_adam else train.optimizer
    adam = {"lr": train.learning_rate, "betas": (train.adam_beta1, train.adam_beta2),
            "weight_decay": train.adam_weight_decay, "eps": train.adam_epsilon}
    args = dict(train.optimizer_args)
    try:
        if train.optimizer_cpu_offload:
            return _cpu_offloaded_adamw(params, {**adam, **args}, device)
        if name == "adamw":  # fused: one kernel for all tensors (LoRA's 256 small ones: 7.0 -> 1.2 ms on CPU)
            return torch.optim.AdamW(params, **{**adam, "fused": device.type in ("cpu", "cuda"), **args})
        if name == "sgd":
            return torch.optim.SGD(params, **{"lr": train.learning_rate, "weight_decay": train.adam_weight_decay,
                                              **args})
        if name == "adafactor":
            return torch.optim.Adafactor(params, **{"lr": train.learning_rate,
                                                    "weight_decay": train.adam_weight_decay, **args})
        if name == "prodigy":
            if train.learning_rate < 0.1:
                logger.warning(f"train.optimizer: prodigy finds its own step size and train.learning_rate "
                               f"({train.learning_rate:g}) multiplies it: 1.0 is the usual value, so this run will "
                               "move very slowly")
            return _package("prodigyopt", name).Prodigy(params, **{**adam, **args})
        if name == "adamw_schedulefree":
            optimizer = _package("schedulefree", name).AdamWScheduleFree(
                params, **{**adam, "warmup_steps": train.lr_warmup_steps, **args})
            optimizer.train()
            return optimizer
        return _adamw_8bit(params, {**adam, **args}, device,
                           "train.use_8bit_adam" if train.use_8bit_adam else "train.optimizer: adamw_8bit")
    except TypeError as error:
        raise UserError(f"train.optimizer_args: {error} ({name} takes other arguments; see its documentation)") \
            from error


def _package(module: str, optimizer: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(f"train.optimizer: {optimizer} needs the {module} package: pip install "
                        f"'finetune-ddpm[optimizers]' (or pip install {module})") from error


def _cpu_offloaded_adamw(params: list[torch.nn.Parameter], settings: dict, device: torch.device):
    """AdamW whose state and update live on the CPU while the weights and gradients stay on the GPU (torchao's
    `CPUOffloadOptimizer`, fused AdamW on the CPU side)."""
    if device.type != "cuda":
        raise ValueError(f"train.optimizer_cpu_offload moves the optimizer from a CUDA GPU to the CPU, and this run "
                         f"is on {device}; set it to false (on a CPU the optimizer is there already)")
    if PartialState().num_processes > 1:
        raise ValueError("train.optimizer_cpu_offload: torchao's CPUOffloadOptimizer is for one process; launch a "
                         "single process, or set it to false")
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError as error:
        raise ValueError("train.optimizer_cpu_offload needs torchao: pip install 'finetune-ddpm[quantization]' (or "
                         "pip install torchao), or set it to false") from error
    return CPUOffloadOptimizer(params, torch.optim.AdamW, **{**settings, "fused": True})


def _adamw_8bit(params: list[torch.nn.Parameter], settings: dict, device: torch.device, key: str):
    """bitsandbytes' blockwise 8-bit AdamW: on a CUDA GPU, or on the CPU from bitsandbytes 0.50 (its CPU kernels
    for the 8-bit optimizers)."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise ValueError(f"{key}: bitsandbytes is not installed; `pip install bitsandbytes`, or use "
                         "train.optimizer: adamw") from error
    version = tuple(int(part) for part in re.findall(r"\d+", bitsandbytes.__version__)[:2])
    if device.type != "cuda" and (device.type != "cpu" or version < (0, 50)):
        raise ValueError(f"{key} needs a CUDA GPU, or bitsandbytes >= 0.50 on the CPU (this run is on {device}, "
                         f"with bitsandbytes {bitsandbytes.__version__}); `pip install -U bitsandbytes`, or use "
                         "train.optimizer: adamw (or adafactor, whose factored moments also save memory)")
    return bitsandbytes.optim.AdamW8bit(params, **settings)


@contextlib.contextmanager
def averaged_weights(optimizer):
    """A schedule-free optimizer's average x in the weights while the block runs (sampling, saving), then the
    training weights y back bit for bit: `eval()` and `train()` each interpolate, and the round trip would not give
    y's bits back, so y is copied aside and restored instead. Other optimizers: nothing changes."""
    inner = getattr(optimizer, "optimizer", optimizer)  # (accelerate's wrapper holds it)
    if not any("train_mode" in group for group in getattr(inner, "param_groups", [])):
        yield
        return
    params = [p for group in inner.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
        for group in inner.param_groups:
            group["train_mode"] = True


# Engines whose gradients are plain tensors, whole on every process once the backward has run (DDP has reduced them).
PLAIN_ENGINES = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def clip_grad_norm(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor | None:
    """`accelerator.clip_grad_norm_(params, max_norm)`: the total norm of the gradients, which are scaled down to
    `max_norm` when above it (`math.inf`: measured only). Under a plain engine without a loss scaler this is torch's
    own norm and clipping, called directly: accelerate's wrapper would first sort the gradients by DTensor mesh (an
    import and an isinstance check per tensor, 0.6 ms a step of host time for a LoRA's 256 tensors; the norms are
    the same, `tests/test_performance.py`). FSDP, DeepSpeed and fp16's unscaling go through accelerate.
    Gradients all of one device and dtype (the usual case) take torch's foreach kernels without its generic
    wrapping, which groups the tensors twice and moves each of the 256 norms to the first device in a Python loop
    (0.4 ms a step of host time on this project's CPU): the same operations, so the same bits."""
    if accelerator.distributed_type not in PLAIN_ENGINES or getattr(accelerator, "scaler", None) is not None:
        return accelerator.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    kinds = {(g.device, g.dtype, type(g)) for g in grads}
    device, _, kind = next(iter(kinds)) if len(kinds) == 1 else (None, None, None)
    if device is None or device.type not in ("cpu", "cuda") or kind is not torch.Tensor:
        total = torch.nn.utils.get_total_norm(grads)
        if max_norm != math.inf:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total
    # torch.nn.utils.get_total_norm and clip_grads_with_norm_ for one device and dtype, step for step.
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    if max_norm != math.inf:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def step_optimizer(optimizer) -> None:
    """`optimizer.step()`. For accelerate's plain wrapper without a loss scaler that step is its optimizer's own
    once the gradients are synchronised (nothing between accumulation steps), after two package lookups at every
    call for LOMO optimizers, which this project never builds (0.5 ms a step of host time): called directly here."""
    if (type(optimizer) is AcceleratedOptimizer and optimizer.scaler is None
            and optimizer.accelerator_state.distributed_type in PLAIN_ENGINES):
        if optimizer.gradient_state.sync_gradients:
            optimizer.optimizer.step()
        return
    optimizer.step()
