"""Build the model components from config (from scratch) or load them from a pipeline folder / Hub id."""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from pipelines import DDPMScheduler, TextToImageDDPMPipeline
from pipelines.pipeline_text2image_ddpm import own_aligned_storage

from . import single_file
from .bases import locate_base
from .cli import UserError
from .config import ModelConfig
from .families import freeze_unused

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


@dataclass
class Components:
    """The parts of a text-to-image DDPM, as the pipeline names them; `vae` only for latent-space models, the second
    text encoder and tokenizer only for SDXL."""

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    text_encoder: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    vae: AutoencoderKL | None = None
    sampler: SchedulerMixin | None = None
    """What samples, when not `scheduler`: for a LoRA, the base's own scheduler, which samples it downstream; for
    SDXL always the base's own (with this run's overrides), as the stock SDXL pipeline needs a diffusers scheduler."""
    text_encoder_2: transformers.PreTrainedModel | None = None
    tokenizer_2: transformers.PreTrainedTokenizerBase | None = None
    force_zeros_for_empty_prompt: bool = True
    """SDXL: the unconditional input is zeros (the base's model_index.json says; training's empty captions too)."""

    @property
    def text_encoders(self) -> list[transformers.PreTrainedModel]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def tokenizers(self) -> list[transformers.PreTrainedTokenizerBase]:
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])

    def pipeline(self) -> DiffusionPipeline:
        """The pipeline downstream code loads: this project's, or for SDXL the stock `StableDiffusionXLPipeline`."""
        if self.text_encoder_2 is not None:
            return sdxl_pipeline_class()(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
                scheduler=self.sampler or self.scheduler, add_watermarker=False,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
        return TextToImageDDPMPipeline(unet=self.unet, scheduler=self.sampler or self.scheduler,
                                       text_encoder=self.text_encoder, tokenizer=self.tokenizer, vae=self.vae)


def sdxl_pipeline_class() -> type[DiffusionPipeline]:
    """diffusers' `StableDiffusionXLPipeline`, imported when an SDXL base needs it: its module loads transformers'
    image processors, which without torchvision print two warnings that have nothing to do with training (and would
    break every command's one-line errors if imported always)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionXLPipeline
    finally:
        transformers.logging.set_verbosity(verbosity)
    return StableDiffusionXLPipeline


def build_tokenizer(texts: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of `texts` (lower-cased, punctuation split off), wrapped so that
    transformers saves and restores it: `<bos> words <eos>`, padded with `<pad>` to `max_length`."""
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]+", text.lower())})
    vocab = {token: i for i, token in enumerate([PAD, UNK, BOS, EOS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_length, pad_token=PAD, unk_token=UNK, bos_token=BOS,
        eos_token=EOS, padding_side="right",
    )


def build_components(config: ModelConfig, resolution: int, caption_texts: Iterable[str]) -> Components:
    """Randomly initialised components shaped by `config`, with a tokenizer built from `caption_texts`."""
    tokenizer = build_tokenizer(caption_texts, config.max_caption_tokens)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden_size,
            intermediate_size=config.text_hidden_size * 4,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_caption_tokens,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.cross_attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.cross_attention_levels)]
    unet = UNet2DConditionModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn" if any(config.cross_attention_levels) else None,
        cross_attention_dim=config.text_hidden_size,
        only_cross_attention=config.only_cross_attention,
        addition_embed_type="text" if config.text_time_embedding else None,
        addition_embed_type_num_heads=config.text_heads,
        attention_head_dim=config.num_attention_heads,  # diffusers' name for the head count
        norm_num_groups=config.norm_num_groups,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type or "epsilon",
        rescale_betas_zero_snr=bool(config.rescale_betas_zero_snr),
        timestep_spacing=config.timestep_spacing or ("trailing" if config.rescale_betas_zero_snr else "leading"),
        clip_sample=True,
    )
    return Components(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def load_components(config: ModelConfig) -> Components:
    """Load the components of a pipeline folder or Hub id: one this project trained (pixel space), a
    Stable-Diffusion-style one with a `vae` (latent space), or an SDXL one (`text_encoder_2`, `tokenizer_2` and a
    UNet with `addition_embed_type: text_time`). Each part is read from its subfolder, so no pipeline code from the
    folder runs; training uses this project's DDPMScheduler with the base scheduler's settings (and the overrides
    `model.prediction_type` / `model.rescale_betas_zero_snr` / `model.timestep_spacing`); `model.
    pretrained_vae_model_name_or_path` replaces the VAE."""
    path, where = base_folder(config), {"revision": config.revision}
    locate_base(path, config.revision)  # a missing base is one line, and a path is never sent to the Hub
    index = DiffusionPipeline.load_config(path, **where)
    missing = [name for name in ("unet", "text_encoder", "tokenizer", "scheduler") if not _has(index, name)]
    if missing:
        raise ValueError(f"{path} is not a text-to-image pipeline this trainer can fine-tune: model_index.json has "
                         f"no {', '.join(missing)}; it needs unet, text_encoder, tokenizer, scheduler (vae optional)")
    xl = _has(index, "text_encoder_2")
    for name in ("text_encoder", "text_encoder_2") if xl else ("text_encoder",):
        library, text_encoder_class = index[name]
        if library != "transformers" or not hasattr(transformers, text_encoder_class):
            raise ValueError(f"{path}: the {name} is {library}.{text_encoder_class}; a transformers model is needed")
    weights = {**where, "variant": config.variant, "use_safetensors": True if config.use_safetensors else None}
    overrides = {k: v for k, v in (("prediction_type", config.prediction_type),
                                   ("rescale_betas_zero_snr", config.rescale_betas_zero_snr),
                                   ("timestep_spacing", config.timestep_spacing)) if v is not None}
    unet, vae = _load_weights(UNet2DConditionModel, path, "unet", weights), None
    if config.pretrained_vae_model_name_or_path:
        vae = load_vae(config.pretrained_vae_model_name_or_path, config.use_safetensors)
    elif _has(index, "vae"):
        vae = _load_weights(AutoencoderKL, path, "vae", weights)
    components = Components(
        unet=unet,
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **where, **overrides),
        text_encoder=_load_weights(getattr(transformers, index["text_encoder"][1]), path, "text_encoder", weights),
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **where),
        vae=vae,
    )
    if xl:
        components.text_encoder_2 = _load_weights(getattr(transformers, index["text_encoder_2"][1]), path,
                                                  "text_encoder_2", weights)
        components.tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **where)
        components.force_zeros_for_empty_prompt = index.get("force_zeros_for_empty_prompt", True)
        components.sampler = base_scheduler(config, overrides)
    check_family(path, components)
    # Aligned from the start, as the pipeline would make them at the first validation: training computes the same
    # bits before and after it, and after a resume.
    for model in (components.unet, *components.text_encoders, components.vae):
        if model is not None:
            own_aligned_storage(model)
    return components


def base_folder(config: ModelConfig) -> str:
    """Where the base's diffusers folder is: `model.pretrained_model_name_or_path` itself (a folder or Hub id), or
    for a single `.safetensors` checkpoint its conversion (`single_file.diffusers_folder`, made once)."""
    path = config.pretrained_model_name_or_path
    if single_file.is_single_file(path):
        return str(single_file.diffusers_folder(path, config.single_file_config))
    return path


def load_vae(path: str, use_safetensors: bool) -> AutoencoderKL:
    """An AutoencoderKL (a folder with its config.json and weights, or a Hub id) to use instead of the base's."""
    try:
        return _load_weights(AutoencoderKL, path, None, {"use_safetensors": True if use_safetensors else None})
    except (OSError, ValueError) as error:
        raise UserError(f"model.pretrained_vae_model_name_or_path={path}: no AutoencoderKL could be loaded from it "
                        f"({type(error).__name__}: {str(error).splitlines()[0]}); give a VAE folder (config.json and "
                        "diffusion_pytorch_model.safetensors) or a Hub id of one") from error


def check_family(path: str, components: Components) -> None:
    """The base must be SD-1.x/2.x-shaped (one text encoder, no added embeddings) or SDXL-shaped (two, with the
    `text_time` embedding of the pooled text and the size-and-crop ids), and its parts must fit each other."""
    unet = components.unet.config
    if components.text_encoder_2 is None:
        if unet.addition_embed_type not in (None, "text"):
            raise ValueError(f"{path}: the UNet has addition_embed_type={unet.addition_embed_type!r} but the pipeline "
                             "one text encoder; this trainer fine-tunes SD-1.x/2.x-shaped bases (none) and SDXL-shaped "
                             "ones (text_time, with text_encoder_2 and tokenizer_2)")
        return
    widths = [encoder.config.hidden_size for encoder in components.text_encoders]
    pooled = getattr(components.text_encoder_2.config, "projection_dim", None)
    time_in = (unet.projection_class_embeddings_input_dim or 0) - 6 * (unet.addition_time_embed_dim or 0)
    if unet.addition_embed_type != "text_time" or sum(widths) != unet.cross_attention_dim or time_in != pooled:
        raise ValueError(f"{path}: an SDXL-style pipeline (text_encoder_2) whose parts do not fit: the UNet needs "
                         f"addition_embed_type 'text_time' (has {unet.addition_embed_type!r}), cross_attention_dim = "
                         f"the encoders' widths {widths} summed (has {unet.cross_attention_dim}), and room for the "
                         f"pooled {pooled}-wide embedding beside six time ids (has {time_in}); this trainer fine-tunes "
                         "SD-1.x/2.x- and SDXL-shaped bases")


def _load_weights(cls, path: str, subfolder: str | None, weights: dict):
    """`cls.from_pretrained` of one component (`subfolder` None: the folder or Hub id is the component); a base with
    only pickle-based weights there (while `model.use_safetensors` asks for safetensors) is refused naming the
    setting."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **weights)
    except OSError as error:
        local = Path(path, subfolder or "")
        pickled = list(local.glob("*.bin")) if local.is_dir() else not Path(path).exists()  # a Hub id: maybe
        if not weights["use_safetensors"] or ".safetensors" not in str(error) or not pickled:
            raise
        raise ValueError(f"{path!r}: {subfolder or '.'}/ has no .safetensors weights "
                         f"({'only' if local.is_dir() else 'perhaps only'} pickle-based .bin ones, and loading a "
                         "pickle can run code). Convert the base to safetensors, or set model.use_safetensors=false "
                         "if you trust where it came from") from error


def sample_as_downstream(config: ModelConfig, components: Components) -> None:
    """For a LoRA run. A LoRA file carries the adapters only, so downstream the base's own scheduler samples them:
    refuse settings that would change the schedule, and draw validation grids with that scheduler."""
    changed = changed_schedule(config, components.scheduler)
    if changed:
        raise ValueError(f"{'; '.join(changed)}: a LoRA file carries the adapters only, so downstream the base's own "
                         "scheduler would sample them. Leave these null for a LoRA run, or fine-tune in full "
                         "(lora.enabled: false)")
    components.sampler = base_scheduler(config)


def base_scheduler(config: ModelConfig, overrides: dict | None = None) -> SchedulerMixin:
    """The scheduler the base pipeline loads itself, in its own class (PNDM for SD-1.x): what samples a LoRA on it
    downstream; with `overrides` (a full fine-tune's schedule settings) applied."""
    path, where = base_folder(config), {"revision": config.revision}
    library, name = DiffusionPipeline.load_config(path, **where)["scheduler"]
    if library == "diffusers":
        cls = getattr(diffusers, name)
    elif (library, name) == ("scheduling_ddpm", "DDPMScheduler"):  # a pipeline this project wrote
        cls = DDPMScheduler
    else:
        raise ValueError(f"{path}: its scheduler is custom code ({library}.{name}), which samples a LoRA downstream; "
                         "this trainer cannot draw validation grids with it. Use a base with a diffusers scheduler")
    return cls.from_pretrained(path, subfolder="scheduler", **where, **(overrides or {}))


def _has(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def changed_schedule(config: ModelConfig, scheduler: DDPMScheduler) -> list[str]:
    """How `scheduler` (the base's, with this config's overrides) differs from the base's own scheduler config,
    as `model.<key>: base -> now` lines; empty from scratch or without overrides."""
    if not config.pretrained_model_name_or_path:
        return []
    base = DDPMScheduler.load_config(base_folder(config), subfolder="scheduler", revision=config.revision)
    defaults = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False, "timestep_spacing": "leading"}
    return [f"model.{key}: {base.get(key, default)!r} -> {scheduler.config[key]!r}" for key, default in defaults.items()
            if base.get(key, default) != scheduler.config[key]]


def check_components(components: Components, config: ModelConfig, export_single_file: bool) -> None:
    """Before training: the VAE's latents fit the UNet, and with `train.export_single_file` the pipeline has a
    single-file form (so a run is not refused only at its end)."""
    vae, unet = components.vae, components.unet
    if vae is not None and vae.config.latent_channels != unet.config.in_channels:
        raise ValueError(f"{config.pretrained_model_name_or_path}: the VAE makes {vae.config.latent_channels}-channel "
                         f"latents but the UNet takes {unet.config.in_channels} channels")
    if export_single_file:
        single_file.exportable(components)


def check_objective(scheduler: DDPMScheduler) -> None:
    """A zero-terminal-SNR schedule makes x_T pure noise, from which no noise prediction recovers x_0: it
    needs a velocity or sample prediction (Lin et al. 2023, section 3.2)."""
    if scheduler.config.rescale_betas_zero_snr and scheduler.config.prediction_type == "epsilon":
        raise ValueError("model.rescale_betas_zero_snr: a zero-terminal-SNR schedule cannot be sampled with "
                         "epsilon prediction; set model.prediction_type: v_prediction (or sample)")


def trained_in_full(components: Components, config: ModelConfig) -> list[torch.nn.Module]:
    """A full fine-tune's trained models, in the order checkpoints hold them: the UNet and, with
    `model.train_text_encoder`, every text encoder (SDXL's two); the encoders that do not train are frozen."""
    for encoder in components.text_encoders:
        encoder.requires_grad_(config.train_text_encoder)
    freeze_unused(components)
    return [components.unet] + (components.text_encoders if config.train_text_encoder else [])


def frozen_models(components: Components, trained: list[torch.nn.Module], lora: bool) -> list[torch.nn.Module]:
    """The models whose weights stay frozen: those that do not train, and with LoRA the adapted ones too (their
    base weights)."""
    return [model for model in (components.unet, *components.text_encoders, components.vae)
            if model is not None and (lora or all(model is not t for t in trained))]


def place_models(components: Components, trained: list[torch.nn.Module], adapted: bool, config: ModelConfig,
                 device: torch.device, mixed_precision: str) -> None:
    """Frozen models (with adapters or new token rows, the adapted ones too: their base weights are frozen) to the
    device in the training precision, in eval mode; then the models that train in training mode, as diffusers'
    examples put them. `from_pretrained` leaves every model in eval mode, where transformers' text encoders skip
    their gradient checkpointing, and sampling, which switches to eval mode and back (`set_training`), would then
    have turned peft's `lora.dropout` off for the rest of the run."""
    for model in frozen_models(components, trained, adapted):
        dtype = frozen_dtype(components, model, config, mixed_precision)
        model.to(device, *([dtype] if model.dtype != dtype else [])).eval()  # (diffusers warns about any cast)
    for model in trained:
        set_training(model)


def set_training(model: torch.nn.Module, mode: bool = True) -> None:
    """`model.train(mode)`, but peft's LoHa / LoKr layers stay in eval mode: this project gives them no module or
    rank dropout, and in training mode each would still draw a random number at every forward (a graph break under
    `train.compile`, and a host operation per layer)."""
    from peft.tuners.lycoris_utils import LycorisLayer

    model.train(mode)
    for module in model.modules():
        if isinstance(module, LycorisLayer):
            module.eval()


def frozen_dtype(components: Components, model: torch.nn.Module, config: ModelConfig,
                 mixed_precision: str) -> torch.dtype:
    """The dtype a frozen model is kept in: the training precision's, but float32 for a VAE that must not run in
    float16 (`model.vae_upcast`; null: an SDXL base's VAE whose config says `force_upcast`, as SDXL's own does and
    the fp16-fixed ones do not; bfloat16 has float32's range and needs no upcast)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    if model is components.vae:
        upcast = config.vae_upcast
        if upcast is None:  # (SDXL only: diffusers' default force_upcast is True for every VAE, SD-1.x's included,
            xl = components.text_encoder_2 is not None  # which trained in fp16 as before)
            upcast = dtype == torch.float16 and xl and bool(model.config.get("force_upcast", False))
        if upcast:
            return torch.float32
    return dtype


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
