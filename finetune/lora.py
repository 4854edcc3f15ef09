"""LoRA adapters (peft) on the text-conditioning path, saved in the diffusers format (and the kohya layout that
ComfyUI, AUTOMATIC1111 and Forge load, `kohya.py`).

Adapters go on the UNet's cross-attention projections (where the text enters) and, optionally, on the text
encoder; the base's own weights stay frozen. The saved file carries peft's adapter metadata: without it
`load_lora_weights` rebuilds an adapter with `lora_alpha = r`, which is silently wrong when alpha != rank.
"""

from pathlib import Path

import torch
import transformers
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoHaConfig, LoKrConfig, PeftConfig, inject_adapter_in_model
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from . import kohya
from .cli import UserError
from .config import LoraConfig
from .families import freeze_unused
from .models import Components

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = kohya.WEIGHT_NAME


CONVOLUTIONS = ["conv1", "conv2", "conv_shortcut"]  # the UNet's ResNet convolutions: LoCon's, and lora.conv_rank's
LYCORIS_WEIGHTS = "lycoris_adapters.safetensors"  # a LoHa / LoKr run's adapters in peft's names, for this project


def peft_config(rank: int, alpha: float | None, targets: list[str], config: LoraConfig,
                convolutions: bool = False) -> PeftConfig:
    """peft's config of `lora.type`'s adapters on `targets` (and, for the UNet, with `convolutions`: on its ResNet
    convolutions at lora.conv_rank, when locon or a conv_rank asks for them)."""
    conv_rank = config.conv_rank or (rank if config.type == "locon" else None)
    convs = CONVOLUTIONS if convolutions and conv_rank else []
    patterns = {"rank_pattern": {conv: conv_rank for conv in convs},
                "alpha_pattern": {conv: config.conv_alpha or conv_rank for conv in convs}}
    if config.type == "loha":
        return LoHaConfig(r=rank, alpha=alpha or rank, target_modules=[*targets, *convs], **patterns)
    if config.type == "lokr":
        return LoKrConfig(r=rank, alpha=alpha or rank, target_modules=[*targets, *convs],
                          decompose_factor=config.lokr_factor, **patterns)
    return PeftLoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=config.dropout,
                          target_modules=[*targets, *convs],
                          init_lora_weights=True if config.init == "default" else config.init,
                          use_dora=config.use_dora, **patterns)


def adapter_configs(unet: torch.nn.Module, text_encoders: list, config: LoraConfig) -> list[tuple]:
    """(model, peft config) for the UNet and, with lora.train_text_encoder, each text encoder."""
    adapted = [(unet, peft_config(config.rank, config.alpha, config.target_modules, config, convolutions=True))]
    if config.train_text_encoder:
        adapted += [(encoder, peft_config(config.text_encoder_rank, config.text_encoder_alpha,
                                          config.text_encoder_target_modules, config))
                    for encoder in text_encoders]
    return adapted


def attach(components: Components, config: LoraConfig, autocast: bool = False) -> list[torch.nn.Module]:
    """Freeze the base and add adapters to its UNet (and text encoders, SDXL's two, when asked); return the models
    that now train. A target that matches no module is an error naming the modules that exist. `autocast`: the
    models only ever run under autocast (mixed precision training), so the adapters skip peft's input casts (unless
    they have dropout or DoRA)."""
    components.unet.requires_grad_(False)
    for encoder in components.text_encoders:
        encoder.requires_grad_(False)
    adapted = adapter_configs(components.unet, components.text_encoders, config)
    for model, adapter in adapted:
        try:
            _add_adapter(model, adapter)
        except ValueError as error:
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear)})
            raise ValueError(f"LoRA targets {adapter.target_modules} for {type(model).__name__}: {error}. Its linear "
                             f"layers end in: {', '.join(linear)} (lora.target_modules matches name suffixes, e.g. "
                             "attn2.to_k)") from None
        if config.type == "lokr" and config.lokr_factor > 0:
            _check_factor(model, config.lokr_factor)
        if autocast and not config.dropout and not config.use_dora:
            _skip_input_casts(model)
    freeze_unused(components)
    outside = kohya.unmapped(components.unet) if components.text_encoder_2 is not None else []
    if outside and config.type in ("loha", "lokr"):  # (the kohya file is their only one)
        raise UserError(f"lora.target_modules: the SDXL LyCORIS file names adapters in the UNet's attention blocks "
                        f"and ResNets only, and {outside[0]} is neither; target those layers")
    if outside and config.save_format == "both":
        raise UserError(f"lora.save_format: both: the SDXL kohya file names adapters in the UNet's attention blocks "
                        f"and ResNets only, and lora.target_modules also adapts {outside[0]}; target those layers, or "
                        "use lora.save_format: auto (then the diffusers file alone) or diffusers")
    return [model for model, _ in adapted]


def _check_factor(model: torch.nn.Module, factor: int) -> None:
    """lora.lokr_factor must divide both dimensions of every adapted layer (peft and LyCORIS would quietly pick
    another split, which LyCORIS' own loader then cannot read back)."""
    for name, module in model.named_modules():
        if hasattr(module, "lokr_w1"):
            base = module.get_base_layer()
            dims = (base.out_features, base.in_features) if isinstance(base, torch.nn.Linear) else \
                (base.out_channels, base.in_channels)
            if any(dim % factor for dim in dims):
                raise UserError(f"lora.lokr_factor: {factor} does not divide the dimensions {dims} of {name}; pick "
                                "a factor of every adapted layer's width, or -1 (automatic)")


def _skip_input_casts(model: torch.nn.Module) -> None:
    """peft casts each adapter's input to its weights' dtype: from the bf16 base's activations to the fp32 adapters.
    Under autocast that cast is undone at once (the adapter's matmuls run in bf16 all the same), so it only adds
    copies, forward and backward. On the CPU they were 6.6% of the SD-shaped LoRA step's operators (28 casts per
    transformer block; benchmarks/README.md). CUDA's autocast keeps the norms' outputs in fp32, so there fewer
    inputs are bf16 (by the source, about 12 casts per block with the targets of SD LoRA recipes): fewer operators
    where the host limits the step, as on an H200, by an amount not yet measured. Switched off for good, as
    `peft.helpers.disable_input_dtype_casting` does for a while. The numbers stay bit-identical; with adapter
    dropout or DoRA they would not (those would run in bf16), so those keep the casts."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def _add_adapter(model: torch.nn.Module, adapter: PeftLoraConfig) -> None:
    """`model.add_adapter(adapter)`, the way diffusers' and transformers' adapter mixins do it. transformers 5's
    own `add_adapter` insists on peft >= 0.22, newer than the package index here has, so transformers models get
    the same two steps done directly: inject the layers, record the config under the adapter's name."""
    if not isinstance(model, transformers.PreTrainedModel):
        model.add_adapter(adapter)
        return
    inject_adapter_in_model(adapter, model, adapter_name="default")
    model.peft_config = {"default": adapter}
    model._hf_peft_config_loaded = True


def save(output_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
         save_format: str = "diffusers", name: str | None = None, text_encoder_2: torch.nn.Module | None = None,
         xl: bool = False) -> Path:
    """Write `output_dir/pytorch_lora_weights.safetensors` as diffusers' LoRA loaders read it (for SDXL, with
    `text_encoder_2`, the SDXL pipeline's), with the adapter configs as metadata, and with `lora.save_format` both
    (or auto, on an SD-1.x/2.x or SDXL base: a latent UNet, without DoRA; on SDXL, adapters in attention blocks
    only) the kohya file beside it (`kohya.save_kohya`, titled `name`, by default the folder's name). The text
    encoders are None unless they carry adapters; `xl`: the base is SDXL (the file is then what
    `StableDiffusionXLPipeline.load_lora_weights` reads).

    The metadata says `lora_dropout: 0`: dropout is for training only, and `load_lora_weights` leaves the
    dropout layers it creates in training mode, so a saved dropout would make every downstream sample random."""
    if isinstance(unet.peft_config["default"], (LoHaConfig, LoKrConfig)):
        return save_lycoris(output_dir, unet, text_encoder, text_encoder_2, name, xl)
    layers, metadata = {}, {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            state = _diffusers_names(get_peft_model_state_dict(model))
            layers[f"{prefix}_lora_layers"] = _full_magnitude_names(state) if prefix != "unet" else state
            adapter = model.peft_config["default"].to_dict()  # sets sorted: the same run, the same metadata
            adapter = {k: sorted(v) if isinstance(v, set) else v for k, v in adapter.items()}
            metadata[f"{prefix}_lora_adapter_metadata"] = {**adapter, "lora_dropout": 0.0}
    loader = StableDiffusionXLLoraLoaderMixin if xl else StableDiffusionLoraLoaderMixin
    loader.save_lora_weights(output_dir, **layers, **metadata, weight_name=WEIGHT_NAME)
    sd_shaped = unet.config.in_channels == 4 and not unet.peft_config["default"].use_dora
    if save_format == "both" or save_format == "auto" and sd_shaped and not (xl and kohya.unmapped(unet)):
        kohya.save_kohya(output_dir, unet, text_encoder, name or Path(output_dir).resolve().name, text_encoder_2, xl)
    return Path(output_dir) / WEIGHT_NAME


def save_lycoris(output_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
                 text_encoder_2: torch.nn.Module | None, name: str | None, xl: bool) -> Path:
    """LoHa / LoKr adapters: the LyCORIS file ComfyUI, AUTOMATIC1111 and Forge load (`lora_kohya.safetensors`), and
    the same adapters in peft's names (`lycoris_adapters.safetensors`), which `load_adapters` puts back on a pipeline
    of the base for this project's tools (stock diffusers cannot load LoHa or LoKr)."""
    models = {prefix: model for prefix, model in (("unet", unet), ("text_encoder", text_encoder),
                                                  ("text_encoder_2", text_encoder_2)) if model is not None}
    state = {f"{prefix}.{key}": value.contiguous() for prefix, model in models.items()
             for key, value in get_peft_model_state_dict(model).items()}
    save_file(state, Path(output_dir) / LYCORIS_WEIGHTS)
    return kohya.save_lycoris(output_dir, models, name or Path(output_dir).resolve().name, xl)


def is_adapter_output(folder: str | Path) -> bool:
    """Whether `folder` holds a LoRA run's adapters (diffusers' file, or a LoHa / LoKr run's peft file)."""
    return any((Path(folder) / name).is_file() for name in (WEIGHT_NAME, LYCORIS_WEIGHTS))


def load_adapters(pipeline, folder: str | Path, config: LoraConfig) -> None:
    """Put a LoHa / LoKr run's adapters on `pipeline`, a pipeline of its base: the adapter layers as the run attached
    them (the lora section of its config.yaml), then their weights from `lycoris_adapters.safetensors`."""
    state = load_file(Path(folder) / LYCORIS_WEIGHTS)
    encoders = [encoder for encoder in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)) if encoder]
    for (model, adapter), prefix in zip(adapter_configs(pipeline.unet, encoders, config),
                                        ("unet", "text_encoder", "text_encoder_2")):
        _add_adapter(model, adapter)
        weights = {key.removeprefix(prefix + "."): value for key, value in state.items()
                   if key.startswith(prefix + ".")}
        result = set_peft_model_state_dict(model, weights)
        if not weights or result.unexpected_keys:
            raise UserError(f"{folder}/{LYCORIS_WEIGHTS} does not fit the adapters its config.yaml describes for the "
                            f"{prefix} (e.g. {(result.unexpected_keys or ['no weights'])[0]}); was config.yaml edited?")


def save_run(output_dir: str | Path, components: Components, config: LoraConfig, name: str | None = None) -> Path:
    """`save` for a run's adapted components: the text encoders when they carry adapters."""
    text = components.text_encoders if config.train_text_encoder else [None, None]
    return save(output_dir, components.unet, text[0], config.save_format, name, text[1] if len(text) > 1 else None,
                xl=components.text_encoder_2 is not None)


def _diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's adapter weights in diffusers' names, as its training scripts save them; but diffusers' converter
    renames the attention projections it knows only, and `load_lora_weights` silently drops the renamed half of a
    half-renamed file (LoCon's, with its convolutions): such a file keeps peft's names throughout, which the loader
    reads as they are."""
    converted = convert_state_dict_to_diffusers(state)
    return state if any(".lora_A." in key or ".lora_B." in key for key in converted) else converted


def _full_magnitude_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DoRA's magnitudes under the name of the parameter they are, `...lora_magnitude_vector.weight`, for the text
    encoder. peft writes `...lora_magnitude_vector` (its format from before the magnitude became a layer) and its
    own loader, `set_peft_model_state_dict`, adds the `.weight` back; it takes both forms, and loads the UNet.
    diffusers hands the text encoder's keys to transformers' `load_adapter`, which from transformers 5 renames them
    itself (`lora_*` to `lora_*.<adapter>`, peft's `build_peft_weight_mapping`): without `.weight` it reports every
    magnitude unexpected, leaves it at the base's weight norms and loads the rest, a silently different encoder."""
    return {f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key: value for key, value in state.items()}


class AdapterCheckpoints:
    """accelerate save/load hooks for a LoRA run: checkpoints hold the trainable (adapter) weights only, not a copy
    of the frozen base (gigabytes for Stable Diffusion); loading puts them back into the adapted models."""

    def __init__(self, accelerator):
        accelerator.register_save_state_pre_hook(self.save)
        accelerator.register_load_state_pre_hook(self.load)

    @staticmethod
    def save(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            weights[i] = {name: value for name, value in weights[i].items() if name in trainable}

    @staticmethod
    def load(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            state = load_file(Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors")
            result = model.load_state_dict(state, strict=False)
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            if result.unexpected_keys or set(state) != trainable:
                raise ValueError(f"checkpoint {input_dir} does not hold this run's adapters for model {i}: "
                                 f"{len(set(state) ^ trainable)} weights differ (was it written with other "
                                 "lora.* settings?)")
        models.clear()  # loaded here; accelerate would insist on the frozen weights too
