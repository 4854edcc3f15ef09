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

from .bases import locate_base
from .config import ModelConfig

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


@dataclass
class Components:
    """The parts of a text-to-image DDPM, as the pipeline names them; `vae` only for latent-space models."""

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    text_encoder: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    vae: AutoencoderKL | None = None
    sampler: SchedulerMixin | None = None
    """What samples, when not `scheduler`: for a LoRA, the base's own scheduler, which samples it downstream."""

    def pipeline(self) -> TextToImageDDPMPipeline:
        return TextToImageDDPMPipeline(unet=self.unet, scheduler=self.sampler or self.scheduler,
                                       text_encoder=self.text_encoder, tokenizer=self.tokenizer, vae=self.vae)


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
    """Load the components of a pipeline folder or Hub id: one this project trained (pixel space) or a
    Stable-Diffusion-style one with a `vae` (latent space). Each part is read from its subfolder, so no
    pipeline code from the folder runs; training uses this project's DDPMScheduler with the base scheduler's
    settings (and the overrides `model.prediction_type` / `model.rescale_betas_zero_snr` /
    `model.timestep_spacing`)."""
    path, where = config.pretrained_model_name_or_path, {"revision": config.revision}
    locate_base(path, config.revision)  # a missing base is one line, and a path is never sent to the Hub
    index = DiffusionPipeline.load_config(path, **where)
    missing = [name for name in ("unet", "text_encoder", "tokenizer", "scheduler") if not _has(index, name)]
    if missing:
        raise ValueError(f"{path} is not a text-to-image pipeline this trainer can fine-tune: model_index.json has "
                         f"no {', '.join(missing)}; it needs unet, text_encoder, tokenizer, scheduler (vae optional)")
    library, text_encoder_class = index["text_encoder"]
    if library != "transformers" or not hasattr(transformers, text_encoder_class):
        raise ValueError(f"{path}: the text encoder is {library}.{text_encoder_class}; a transformers model is needed")
    weights = {**where, "variant": config.variant, "use_safetensors": True if config.use_safetensors else None}
    overrides = {k: v for k, v in (("prediction_type", config.prediction_type),
                                   ("rescale_betas_zero_snr", config.rescale_betas_zero_snr),
                                   ("timestep_spacing", config.timestep_spacing)) if v is not None}
    components = Components(
        unet=_load_weights(UNet2DConditionModel, path, "unet", weights),
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **where, **overrides),
        text_encoder=_load_weights(getattr(transformers, text_encoder_class), path, "text_encoder", weights),
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **where),
        vae=_load_weights(AutoencoderKL, path, "vae", weights) if _has(index, "vae") else None,
    )
    # Aligned from the start, as the pipeline would make them at the first validation: training computes the same
    # bits before and after it, and after a resume.
    for model in (components.unet, components.text_encoder, components.vae):
        if model is not None:
            own_aligned_storage(model)
    return components


def _load_weights(cls, path: str, subfolder: str, weights: dict):
    """`cls.from_pretrained` of one component; a base with only pickle-based weights there (while
    `model.use_safetensors` asks for safetensors) is refused naming the setting."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **weights)
    except OSError as error:
        local = Path(path, subfolder)
        pickled = list(local.glob("*.bin")) if local.is_dir() else not Path(path).exists()  # a Hub id: maybe
        if not weights["use_safetensors"] or ".safetensors" not in str(error) or not pickled:
            raise
        raise ValueError(f"model.pretrained_model_name_or_path={path!r}: {subfolder}/ has no .safetensors weights "
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


def base_scheduler(config: ModelConfig) -> SchedulerMixin:
    """The scheduler the base pipeline loads itself, in its own class (PNDM for SD-1.x): what samples a LoRA on it
    downstream."""
    path, where = config.pretrained_model_name_or_path, {"revision": config.revision}
    library, name = DiffusionPipeline.load_config(path, **where)["scheduler"]
    if library == "diffusers":
        cls = getattr(diffusers, name)
    elif (library, name) == ("scheduling_ddpm", "DDPMScheduler"):  # a pipeline this project wrote
        cls = DDPMScheduler
    else:
        raise ValueError(f"{path}: its scheduler is custom code ({library}.{name}), which samples a LoRA downstream; "
                         "this trainer cannot draw validation grids with it. Use a base with a diffusers scheduler")
    return cls.from_pretrained(path, subfolder="scheduler", **where)


def _has(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def changed_schedule(config: ModelConfig, scheduler: DDPMScheduler) -> list[str]:
    """How `scheduler` (the base's, with this config's overrides) differs from the base's own scheduler config,
    as `model.<key>: base -> now` lines; empty from scratch or without overrides."""
    if not config.pretrained_model_name_or_path:
        return []
    base = DDPMScheduler.load_config(config.pretrained_model_name_or_path, subfolder="scheduler",
                                     revision=config.revision)
    defaults = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False, "timestep_spacing": "leading"}
    return [f"model.{key}: {base.get(key, default)!r} -> {scheduler.config[key]!r}" for key, default in defaults.items()
            if base.get(key, default) != scheduler.config[key]]


def check_objective(scheduler: DDPMScheduler) -> None:
    """A zero-terminal-SNR schedule makes x_T pure noise, from which no noise prediction recovers x_0: it
    needs a velocity or sample prediction (Lin et al. 2023, section 3.2)."""
    if scheduler.config.rescale_betas_zero_snr and scheduler.config.prediction_type == "epsilon":
        raise ValueError("model.rescale_betas_zero_snr: a zero-terminal-SNR schedule cannot be sampled with "
                         "epsilon prediction; set model.prediction_type: v_prediction (or sample)")


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
