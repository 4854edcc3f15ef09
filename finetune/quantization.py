"""A quantized base for LoRA (`model.base_quantization`): the frozen UNet's and text encoders' linear layers held
in 8 or 4 bits while the adapters train in full precision, so an SDXL-class base fits a small GPU.

- `int8`: torchao's int8 weight-only quantization (`Int8WeightOnlyConfig`, what diffusers' `TorchAoConfig
  ("int8_weight_only")` applies after loading): per-channel int8 weights, computed in the training precision.
- `fp8`: torchao's float8 weight-only (`Float8WeightOnlyConfig`): e4m3 weights, computed in the training precision.
- `nf4`: bitsandbytes' 4-bit NormalFloat layers (`Linear4bit`, QLoRA's format), which run on the CPU from
  bitsandbytes 0.46 (diffusers' own `BitsAndBytesConfig` refuses to run without a GPU, so the layers are swapped in
  here directly).

Convolutions, norms and the VAE stay as they are. peft puts its adapters on the quantized layers (on torchao's
through its torchao LoRA layer); the adapters' weights are ordinary tensors, so the LoRA file a run writes is the one
an unquantized run writes and loads on the full-precision base.
"""

import functools
import importlib
import re

import torch

from .cli import UserError

EXTRAS = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}


def quantize_base(components, mode: str, dtype: torch.dtype, device: torch.device) -> None:
    """With `mode` other than none, quantize the UNet and the text encoders of a LoRA run's base (before the
    adapters are attached, so that peft wraps the quantized layers)."""
    if mode == "none":
        return
    for model in (components.unet, *components.text_encoders):
        quantize(model, mode, dtype, device)


def quantize(model: torch.nn.Module, mode: str, dtype: torch.dtype, device: torch.device) -> None:
    """Quantize the linear layers of `model` in place (`mode`: int8, fp8, nf4), computing in `dtype`, and move it to
    `device`. The model is cast where it was loaded (the CPU) and each layer is quantized as it moves, so the
    full-precision weights never reach the GPU all at once: its peak is the quantized model and one layer."""
    library = _library(mode)
    if mode == "nf4" and device.type == "cpu" and _version(library.__version__) < (0, 46):
        raise UserError(f"model.base_quantization: nf4 on the CPU needs bitsandbytes >= 0.46 (its CPU 4-bit "
                        f"kernels; this is {library.__version__}): pip install -U bitsandbytes, or use int8 or fp8")
    model.to(dtype)
    if mode == "nf4":
        _swap_in_nf4(model, dtype, device)
    else:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig(), device=device)
    model.to(device)  # (the rest: convolutions, norms, embeddings)
    if dtype != torch.float32:  # autocast does not reach quantized layers: their float32 inputs would stay float32
        for module in model.modules():  # and make float32 outputs, which meet the base's bf16 norms downstream
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(functools.partial(_cast_inputs, dtype=dtype))


def _cast_inputs(module: torch.nn.Module, args: tuple, dtype: torch.dtype) -> tuple:
    """A quantized layer's input in its compute dtype, as autocast casts a plain layer's."""
    return tuple(arg.to(dtype) if torch.is_tensor(arg) and arg.is_floating_point() else arg for arg in args)


def _library(mode: str):
    name = EXTRAS[mode]
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise UserError(f"model.base_quantization: {mode} needs the {name} package: pip install "
                        f"'finetune-ddpm[quantization]' (or pip install {name}), or set it to none") from error


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def _swap_in_nf4(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Every `nn.Linear` of `model` replaced by a bitsandbytes NF4 layer holding its weight (quantized when moved to
    the device), its bias kept as it is."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            layer.bias = child.bias
            # bitsandbytes >= 0.49 repacks the weights of an eval-mode layer on an AVX512-BF16 CPU for a faster
            # inference kernel (and needs widths divisible by 32 for it): validation and text encoding would run
            # another kernel than training does. One kernel for both.
            layer.support_avx512bf16_for_cpu = False
            setattr(module, name, layer.to(device))


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes a model's weights take as stored: quantized tensors at their packed size, with their scales."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        inner = getattr(tensor, "__tensor_flatten__", None)
        parts = [getattr(tensor, name) for name in inner()[0]] if inner else [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
        state = getattr(tensor, "quant_state", None)  # bitsandbytes' 4-bit blocks keep their scales beside
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total
