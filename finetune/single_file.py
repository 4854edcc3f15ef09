"""Single-file checkpoints: the one `.safetensors` file in the original (LDM) layout that model sites share and
ComfyUI, AUTOMATIC1111 and Forge load, for SD-1.x and SDXL bases.

In: a base given as such a file is loaded with diffusers' `from_single_file`, always fully offline: `config=` is a
local diffusers folder of the base's configs, tokenizers and scheduler (`model.single_file_config`, or for SD-1.x
and SDXL one built from the configs this package ships, the family told from the file's keys). diffusers falls back
to downloading when it has no config; here it never gets the chance. Pickled `.ckpt` files are refused.

Out: a full fine-tune's pipeline as one file (`train.export_single_file`): the UNet under `model.diffusion_model.`
(`input_blocks` / `middle_block` / `output_blocks`, ResNets as `in_layers` / `emb_layers` / `out_layers`), the VAE
under `first_stage_model.` (`down.N.block.M`, its mid attention as 1x1 convolutions), CLIP-L under
`cond_stage_model.transformer.text_model.` (SD-1.x) or `conditioner.embedders.0.transformer.text_model.` (SDXL)
and OpenCLIP-G under `conditioner.embedders.1.model.` (`resblocks.N.attn.in_proj_weight`: q, k and v in one; the
projection transposed). The names are the inverse of diffusers' own LDM converter (`loaders/single_file_utils.py`),
which the tests run on the export, at full size as well as tiny.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .cli import UserError

logger = logging.getLogger(__name__)

KEY = "model.pretrained_model_name_or_path"
CONFIG_KEY = "model.single_file_config"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SHIPPED = Path(__file__).resolve().parent / "base_configs"  # SD-1.5's and SDXL base 1.0's configs, and CLIP's BPE

# Keys that tell the families apart (diffusers' `CHECKPOINT_KEY_NAMES`: "clip", "open_clip", "open_clip_sdxl").
SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
XL_TEXT = "conditioner.embedders.1.model.positional_embedding"
UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT = {"sd15": "cond_stage_model.transformer.text_model.", "sdxl": "conditioner.embedders.0.transformer.text_model."}
OPEN_CLIP = "conditioner.embedders.1.model."
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPLETE = ".conversion-complete"  # written last into a conversion


def is_single_file(path: str | None) -> bool:
    """Whether a base names one weights file rather than a pipeline folder or Hub id."""
    return bool(path) and Path(path).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)


# ---- in -------------------------------------------------------------------------------------------------------


def family(keys: set[str], path: str) -> str:
    """'sd15' or 'sdxl' for a file in the original layout; SD-2.x (whose 512 px epsilon and 768 px v-prediction
    files have the same keys) and anything else is a UserError asking for `model.single_file_config`."""
    if UNET + "input_blocks.0.0.weight" not in keys:
        raise UserError(f"{KEY}={path}: no UNet in the original (LDM) layout in this file (no {UNET}... keys; it has "
                        f"e.g. {sorted(keys)[:3]}); give an SD-1.x or SDXL checkpoint, or a diffusers folder")
    if XL_TEXT in keys and TEXT["sdxl"] + "embeddings.position_embedding.weight" in keys:
        return "sdxl"
    if SD1_TEXT in keys:
        return "sd15"
    kind = "an SD-2.x checkpoint (512 px epsilon or 768 px v-prediction: the keys cannot tell)" \
        if SD2_TEXT in keys else "a checkpoint of no family this project knows (not SD-1.x, SD-2.x or SDXL)"
    raise UserError(f"{KEY}={path} is {kind}; set {CONFIG_KEY} to a diffusers folder with the base's configs, "
                    "tokenizer and scheduler (the base's own diffusers folder; its weights are not read)")


def shipped_config(name: str, folder: Path) -> Path:
    """Write the diffusers config folder of a shipped base ('sd15' or 'sdxl') into `folder`: the published
    configs, and CLIP's BPE vocabulary in each tokenizer folder."""
    out = folder / name
    shutil.copytree(SHIPPED / name, out)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (out / tokenizer).is_dir():
            for part in ("vocab.json", "merges.txt"):
                shutil.copyfile(SHIPPED / "clip-bpe" / part, out / tokenizer / part)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def read_keys(path: str) -> tuple[Path, set[str], torch.dtype]:
    """The file, its tensor names and the dtype its UNet is stored in; pickles and unreadable files refused."""
    file = Path(path).expanduser()
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{KEY}={path} is a pickled checkpoint ({file.suffix}): loading one can run code, and this "
                        "project loads weights from safetensors only; use the base's .safetensors release (or "
                        "convert it where you trust the file)")
    if not file.is_file():
        raise UserError(f"{KEY}={path}: no such file")
    try:
        with safe_open(str(file), "pt") as weights:
            keys = set(weights.keys())
            probe = UNET + "input_blocks.0.0.weight"
            dtype = weights.get_slice(probe).get_dtype() if probe in keys else "F32"
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{KEY}={path} is not a readable safetensors file ({error})") from error
    return file, keys, {"F16": torch.float16, "BF16": torch.bfloat16}.get(dtype, torch.float32)


def diffusers_folder(path: str, config_folder: str | None) -> Path:
    """The single file `path` as a diffusers folder, converted by diffusers' `from_single_file` with the configs of
    `config_folder` (default: the shipped ones of the family its keys show) on first use and kept in the cache
    (`$FINETUNE_CACHE/single-file/`, the weights in the file's precision), so that every command that reads the
    base (training, export, sampling a LoRA on it) reads the same folder. A changed file or config folder is
    converted again. With several processes, one per machine converts while the others wait, then read it."""
    from accelerate import PartialState

    file, keys, dtype = read_keys(path)
    check_config_folder(config_folder)
    shipped = None if config_folder else family(keys, path)  # (or the error that asks for the config folder)
    out = conversion(path, config_folder)
    with PartialState().local_main_process_first():
        if not (out / COMPLETE).is_file():
            _convert(file, shipped, config_folder, dtype, out)
            logger.info(f"{KEY}={path}: converted to a diffusers folder, {out} (kept for later runs; delete it to "
                        "free the space)")
    return out


def check_config_folder(config_folder: str | None) -> None:
    if config_folder and not (Path(config_folder).expanduser() / "model_index.json").is_file():
        raise UserError(f"{CONFIG_KEY}={config_folder}: no model_index.json there; give the base's diffusers folder "
                        "(configs, tokenizer and scheduler; its weights are not read)")


def _convert(file: Path, shipped: str | None, config_folder: str | None, dtype: torch.dtype, out: Path) -> None:
    """Write the conversion beside `out` and rename it into place once complete (marked by `COMPLETE`, written
    last): a conversion that was killed, or one that lost the race to another run, is never read."""
    for stale in out.parent.glob(f".tmp-{out.name}-*"):  # (left by a conversion that was killed)
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="finetune-base-config-") as scratch:
        folder = shipped_config(shipped, Path(scratch)) if shipped else Path(config_folder).expanduser()
        pipeline = _from_single_file(file, folder, dtype)
        pipeline.save_pretrained(tmp)
    for name in ("text_encoder", "text_encoder_2"):  # transformers writes them on global rank 0 only
        model = getattr(pipeline, name, None)
        if model is not None and not (tmp / name / "model.safetensors").is_file():
            model.config.save_pretrained(tmp / name)
            save_file({key: value.contiguous() for key, value in model.state_dict().items()},
                      tmp / name / "model.safetensors", metadata={"format": "pt"})
    (tmp / COMPLETE).write_text(json.dumps({"file": str(file), "config": config_folder or shipped}) + "\n")
    if out.exists() and not (out / COMPLETE).is_file():
        shutil.rmtree(out, ignore_errors=True)  # an incomplete conversion
    try:
        tmp.rename(out)
    except OSError:  # another run converted it first
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(pid) > 0


def conversion(path: str, config_folder: str | None) -> Path:
    """Where the conversion of this file (with these configs) is kept."""
    file = Path(path).expanduser()
    return cache_root() / "single-file" / f"{file.stem}-{fingerprint(file, config_folder)}"


def fingerprint(file: Path, config_folder: str | None) -> str:
    """What identifies a conversion: the file's size, modification time and header (its tensor names, shapes and
    offsets), and the config folder's JSON files."""
    digest, stat = hashlib.sha256(), file.stat()
    digest.update(f"{stat.st_size} {stat.st_mtime_ns}".encode())
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        digest.update(handle.read(min(size, 1 << 26)))
    for config in sorted(Path(config_folder).expanduser().rglob("*.json")) if config_folder else []:
        digest.update(config.read_bytes())
    return digest.hexdigest()[:16]


def _from_single_file(file: Path, folder: Path, dtype: torch.dtype):
    """The pipeline of a single file, by diffusers' own converter, offline; every weight the configs call for must
    be in the file."""
    from diffusers import StableDiffusionPipeline

    from .models import sdxl_pipeline_class

    xl = "text_encoder_2" in json.loads((folder / "model_index.json").read_text())
    kwargs = {} if xl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipeline_class = sdxl_pipeline_class() if xl else StableDiffusionPipeline
    try:
        pipeline = pipeline_class.from_single_file(str(file), config=str(folder), local_files_only=True,
                                                   dtype=dtype, **kwargs)
    except (ValueError, RuntimeError, KeyError, OSError) as error:
        raise UserError(f"{KEY}={file}: diffusers could not load it with the configs of {folder} "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:300]}); check that the file is the "
                        f"base those configs describe ({CONFIG_KEY})") from error
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipeline, name, None)
        missing = [key for key, value in model.state_dict().items() if value.is_meta] if model is not None else []
        if missing:
            raise UserError(f"{KEY}={file}: its {name} lacks {len(missing)} of the weights the config folder's "
                            f"{name} has (e.g. {missing[0]}); the file is not of the base {folder} describes")
    return pipeline


# ---- out ------------------------------------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_PART = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
                        r"|mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def unet_key(key: str, config) -> str:
    """The LDM name of a diffusers UNet parameter. The LDM UNet numbers its blocks in order: input block 0 is
    conv_in, then per level `layers_per_block` (ResNet, attention) blocks and a downsampler; output blocks take
    `layers_per_block + 1` per level, the upsampler inside the level's last one (after its attention, when it has
    one); the middle block is ResNet, attention, ResNet."""
    for diffusers_name, ldm in _UNET_TOP.items():
        if key.startswith(diffusers_name + "."):
            return ldm + key[len(diffusers_name):]
    match = _UNET_PART.fullmatch(key)
    if not match:
        raise UserError(f"the UNet parameter {key} has no name in the original (LDM) layout; this base cannot be "
                        "exported as a single file (set train.export_single_file: false)")
    side, level, kind, index, rest, mid_kind, mid_index, mid_rest = match.groups()
    stride = config.layers_per_block + 1
    if mid_kind:
        return f"middle_block.{2 * int(mid_index) if mid_kind == 'resnets' else 1}.{_resnet(mid_rest, mid_kind)}"
    level, index = int(level), int(index)
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * stride}.0.op.{rest.removeprefix('conv.')}"
        return f"input_blocks.{1 + level * stride + index}.{0 if kind == 'resnets' else 1}.{_resnet(rest, kind)}"
    if kind == "upsamplers":
        attention = "CrossAttn" in config.up_block_types[level]
        return f"output_blocks.{level * stride + stride - 1}.{2 if attention else 1}.{rest}"
    return f"output_blocks.{level * stride + index}.{0 if kind == 'resnets' else 1}.{_resnet(rest, kind)}"


def _resnet(rest: str, kind: str) -> str:
    if kind != "resnets":
        return rest
    layer, _, tail = rest.partition(".")
    return f"{_RESNET.get(layer, layer)}.{tail}"


_VAE_PART = re.compile(r"(encoder|decoder)\.(?:(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)"
                       r"|mid_block\.(resnets|attentions)\.(\d+))\.(.+)")
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, levels: int) -> str:
    """The LDM name of a diffusers VAE parameter: levels keep their order in the encoder (`down.N`) and are
    numbered from the bottom in the decoder (`up.N`, N = levels - 1 - level); the mid block is block_1, attn_1,
    block_2; ResNet shortcuts are `nin_shortcut`, the output norms `norm_out`."""
    key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    match = _VAE_PART.fullmatch(key)
    if not match:
        return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv: the same names
    part, side, level, kind, index, mid_kind, mid_index, rest = match.groups()
    if mid_kind == "resnets":
        return f"{part}.mid.block_{int(mid_index) + 1}.{rest}"
    if mid_kind == "attentions":
        layer, _, tail = rest.rpartition(".")
        return f"{part}.mid.attn_1.{_VAE_ATTENTION.get(layer, layer)}.{tail}"
    n = int(level) if side == "down_blocks" else levels - 1 - int(level)
    name = {"resnets": f"block.{index}", "downsamplers": "downsample", "upsamplers": "upsample"}[kind]
    return f"{part}.{'down' if side == 'down_blocks' else 'up'}.{n}.{name}.{rest}"


_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}


def open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's names for a `CLIPTextModelWithProjection` (SDXL's second encoder): q, k and v projections
    concatenated into `attn.in_proj_*`, the text projection as the matrix OpenCLIP multiplies by (the Linear's
    weight transposed)."""
    out, top = {}, {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            layer, kind = match.groups()
            parts = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
        elif re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias)", key):
            continue  # in in_proj above
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, module, kind = match.groups()
            if module not in _OPEN_CLIP:
                raise UserError(f"the second text encoder's {key} has no OpenCLIP name")
            out[f"transformer.resblocks.{layer}.{_OPEN_CLIP[module]}.{kind}"] = value
        else:
            raise UserError(f"the second text encoder's {key} has no OpenCLIP name")
    return out


def exportable(components) -> str:
    """'sd15' or 'sdxl' when the pipeline can be written as a single file; otherwise a UserError naming why."""
    why = None
    if components.vae is None:
        why = "it is a pixel-space model (no VAE): the original layout is that of latent diffusion"
    elif components.text_encoder_2 is None and components.text_encoder.config.hidden_act != "quick_gelu":
        why = ("its text encoder is SD-2.x's OpenCLIP-H, whose original file keeps a 24th layer the diffusers folder "
               "does not have")
    elif not isinstance(components.unet.config.layers_per_block, int):
        why = "its UNet has a different number of layers per level, which the original layout cannot number"
    if why:
        raise UserError(f"train.export_single_file: this base cannot be written as a single file: {why}; set it to "
                        "false and use the diffusers folder")
    return "sdxl" if components.text_encoder_2 is not None else "sd15"


def ldm_state(components) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline's UNet, VAE and text encoder(s) under its original (LDM) name."""
    name = exportable(components)
    unet, vae = components.unet, components.vae
    state = {UNET + unet_key(key, unet.config): value for key, value in unet.state_dict().items()}
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        ldm = vae_key(key, levels)
        state[VAE + ldm] = value[..., None, None] if ".mid.attn_1." in ldm and value.dim() == 2 else value
    for key, value in components.text_encoder.state_dict().items():
        state[TEXT[name] + key.removeprefix("text_model.")] = value
    if components.text_encoder_2 is not None:
        for key, value in open_clip_state(components.text_encoder_2.state_dict()).items():
            state[OPEN_CLIP + key] = value
    return state


def save(components, path: str | Path, precision: str = "fp16", title: str = "") -> Path:
    """Write the pipeline's weights as one `.safetensors` file in the original layout, floating-point tensors in
    `precision`, with the `modelspec.*` metadata model sites and tools read."""
    name = exportable(components)
    dtype = PRECISIONS[precision]
    state = {key: (value.to(dtype) if value.is_floating_point() else value).contiguous()
             for key, value in ldm_state(components).items()}
    architecture = "stable-diffusion-xl-v1-base" if name == "sdxl" else "stable-diffusion-v1"
    metadata = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
                "modelspec.title": title or Path(path).stem}
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(state, tmp, metadata=metadata)
    tmp.replace(path)
    return path
