"""The kohya layout of a run's LoRA: the file ComfyUI, AUTOMATIC1111 and Forge load (shared/INTEROP.md).

Keys come from diffusers' own `convert_state_dict_to_kohya`, with what it gets wrong put right: each module's
`.alpha` is the adapter's real alpha (the converter writes the rank, which every client would apply at rank/alpha
of the strength), and text-encoder keys carry `text_model_` as those clients match them (under transformers 5 the
converter leaves it out, and ComfyUI then skips every text-encoder key while Forge drops the whole file):
`lora_te_text_model_...` on SD-1.x/2.x, `lora_te1_text_model_...` (CLIP-L) and `lora_te2_text_model_...`
(OpenCLIP-G) on SDXL. SDXL's UNet modules get their original (LDM) names, `lora_unet_input_blocks_4_1_...`, the
form kohya's sd-scripts write for SDXL and every one of those tools maps (AUTOMATIC1111's converter of
diffusers-style names was written for SD-1's block layout only).
"""

import json
import re
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .cli import UserError

WEIGHT_NAME = "lora_kohya.safetensors"


def save_kohya(output_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, name: str,
               text_encoder_2: torch.nn.Module | None = None, xl: bool = False) -> Path:
    """Write `output_dir/lora_kohya.safetensors` for an SD-1.x/2.x base (or with `xl`, an SDXL one), with the
    safetensors metadata those tools read (`ss_network_dim`, `ss_network_alpha`, base model, `modelspec.*`)."""
    state, alphas = {}, {}
    encoders = {"text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is None:
            continue
        alphas[prefix] = float(model.peft_config["default"].lora_alpha)
        scales = {name.replace(".", "_"): module.scaling["default"] for name, module in model.named_modules()
                  if isinstance(module, BaseTunerLayer)}  # per module: lora.conv_alpha / conv_rank on convolutions
        peft_state = {f"{prefix}.{key}": value for key, value in get_peft_model_state_dict(model).items()}
        for key, value in convert_state_dict_to_kohya(peft_state).items():
            if key.endswith(".alpha"):  # (the converter's is the module's rank: len(lora_down))
                value = torch.tensor(float(value) * scales[key.split(".")[0].split("_", 2)[2]])
            if prefix != "unet":
                key = re.sub(r"^lora_te[12]_(text_model_)?", encoders[prefix] + "text_model_", key)
            elif xl:
                key = ldm_name(key, unet.config.layers_per_block)
            state[key] = value.contiguous()
    v2 = unet.config.cross_attention_dim == 1024  # SD-2.x's OpenCLIP-H width (SD-1.x: 768)
    version, architecture = ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base") if xl else \
        ("sd_v2" if v2 else "sd_v1", f"stable-diffusion-v{'2' if v2 else '1'}")
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(unet.peft_config["default"].r),
        "ss_network_alpha": f"{alphas['unet']:g}", "ss_base_model_version": version, "ss_v2": str(v2 and not xl),
        "ss_output_name": name, "modelspec.sai_model_spec": "1.0.0", "modelspec.title": name,
        "modelspec.architecture": f"{architecture}/lora",
    }
    path = Path(output_dir) / WEIGHT_NAME
    save_file(state, path, metadata=metadata)
    return path


_BLOCK = re.compile(r"lora_unet_(?:down_blocks_(\d+)_(attentions|resnets)_(\d+)"
                    r"|up_blocks_(\d+)_(attentions|resnets)_(\d+)|mid_block_(attentions|resnets)_(\d+))_(.+)")
# A ResNet's layers under their LDM names (diffusers' `unet_conversion_map_resnet`, read the other way).
_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "conv_shortcut": "skip_connection",
           "time_emb_proj": "emb_layers_1"}


def ldm_name(key: str, layers_per_block: int) -> str:
    """An SDXL UNet key in diffusers' naming, `lora_unet_down_blocks_1_attentions_0_<rest>`, in the original one,
    `lora_unet_input_blocks_4_1_<rest>`: the LDM UNet numbers its input blocks 1 + level x (layers + 1) + layer
    (block 0 is the first convolution), its output blocks level x (layers + 1) + layer, and puts a level's
    ResNet at index 0 and its transformer at index 1 (the middle block: ResNet, transformer, ResNet); inside a
    transformer the names are the same, a ResNet's convolutions are `in_layers_2` / `out_layers_3` /
    `skip_connection`. The inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`, for attention blocks and
    ResNets (what `lora.target_modules` and `lora.conv_rank` may adapt)."""
    module = key.split(".")[0]
    match = _nameable(module)
    if match is None or not isinstance(layers_per_block, int):
        raise UserError(f"lora: the SDXL kohya file cannot name {module} (outside the UNet's attention blocks and "
                        "ResNet convolutions); target those (to_q, to_k, to_v, to_out.0, proj_in, ff.net.0.proj, "
                        "conv1, ...) or set lora.save_format: diffusers")
    down, down_kind, down_layer, up, up_kind, up_layer, mid_kind, mid_layer, rest = match.groups()
    stride = layers_per_block + 1
    kind = down_kind or up_kind or mid_kind
    if kind == "resnets":
        rest = _RESNET[rest]
    if down is not None:
        block = f"input_blocks_{1 + int(down) * stride + int(down_layer)}_{0 if kind == 'resnets' else 1}"
    elif up is not None:
        block = f"output_blocks_{int(up) * stride + int(up_layer)}_{0 if kind == 'resnets' else 1}"
    else:
        block = f"middle_block_{2 * int(mid_layer) if kind == 'resnets' else 1}"
    return f"lora_unet_{block}_{rest}" + key[len(module):]


def _nameable(module: str) -> re.Match | None:
    """The match of a UNet module's kohya name (`lora_unet_...`) that `ldm_name` can rename, else None."""
    match = _BLOCK.fullmatch(module)
    if match and "resnets" in match.groups() and match.group(9) not in _RESNET:
        return None
    return match


def unmapped(unet: torch.nn.Module) -> list[str]:
    """The adapted modules of an SDXL UNet that the kohya file cannot name (outside its attention blocks and ResNet
    layers; all of them for a UNet with per-level ResNet counts)."""
    modules = [name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]
    if not isinstance(unet.config.layers_per_block, int):  # (per-level counts: no LDM numbering written for them)
        return modules
    return [module for module in modules if not _nameable(f"lora_unet_{module.replace('.', '_')}")]


# ---- LyCORIS (LoHa, LoKr) ------------------------------------------------------------------------------------

LYCORIS_PARTS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
                 "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}


def save_lycoris(output_dir: str | Path, models: dict[str, torch.nn.Module], name: str, xl: bool = False) -> Path:
    """Write `output_dir/lora_kohya.safetensors` for peft LoHa or LoKr adapters in the layout of LyCORIS, which
    ComfyUI, AUTOMATIC1111 and Forge load: `<kohya module name>.hada_w1_a` ... or `.lokr_w1` / `.lokr_w2_a` ...,
    and `.alpha`. The loaders disagree on the scale: ComfyUI and AUTOMATIC1111 apply alpha / rank once, LyCORIS' own
    merge applies it twice to a LoHa, and a LoKr with both factors full is applied at 1 whatever its alpha. So
    peft's scale is folded into the first factor and alpha written equal to the rank (scale 1), which every one of
    them applies alike. `models`: "unet", "text_encoder", "text_encoder_2" that carry adapters."""
    state, algo = {}, None
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    for prefix, model in models.items():
        for module_name, module in model.named_modules():
            kind = "loha" if hasattr(module, "hada_w1_a") else "lokr" if hasattr(module, "lokr_w1") else None
            if kind is None or "default" not in module.scaling:
                continue
            algo = kind
            key = prefixes[prefix] + (module_name if prefix == "unet" else
                                      "text_model." + module_name.removeprefix("text_model.")).replace(".", "_")
            if prefix == "unet" and xl:
                key = ldm_name(key, model.config.layers_per_block)
            parts = {part: getattr(module, part)["default"].detach() for part in LYCORIS_PARTS[kind]
                     if "default" in getattr(module, part, {})}
            rank = (parts["hada_w1_b"].shape[0] if kind == "loha" else
                    next((parts[p].shape[1] for p in ("lokr_w1_a", "lokr_w2_a") if p in parts), 1))
            first = next(part for part in ("hada_w1_a", "lokr_w1", "lokr_w1_a") if part in parts)
            parts[first] = parts[first] * module.scaling["default"]
            state.update({f"{key}.{part}": value.contiguous() for part, value in parts.items()})
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    adapter, v2 = models["unet"].peft_config["default"], models["unet"].config.cross_attention_dim == 1024
    version, architecture = ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base") if xl else \
        ("sd_v2" if v2 else "sd_v1", f"stable-diffusion-v{'2' if v2 else '1'}")
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(adapter.r),
                "ss_network_alpha": f"{adapter.alpha:g}", "ss_network_args": json.dumps({"algo": algo}),
                "ss_base_model_version": version, "ss_v2": str(v2 and not xl), "ss_output_name": name,
                "modelspec.sai_model_spec": "1.0.0", "modelspec.title": name,
                "modelspec.architecture": f"{architecture}/lycoris"}
    path = Path(output_dir) / WEIGHT_NAME
    save_file(state, path, metadata=metadata)
    return path
