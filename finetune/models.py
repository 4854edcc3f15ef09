"""Build the model components from config (from scratch) or load them from a pipeline folder / Hub id."""

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from pipelines import DDPMScheduler, TextToImageDDPMPipeline

from .config import ModelConfig

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


@dataclass
class Components:
    """The parts of a text-to-image DDPM, as the pipeline names them."""

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerFast

    def pipeline(self) -> TextToImageDDPMPipeline:
        return TextToImageDDPMPipeline(
            unet=self.unet, scheduler=self.scheduler, text_encoder=self.text_encoder, tokenizer=self.tokenizer
        )


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
        prediction_type=config.prediction_type,
        clip_sample=True,
    )
    return Components(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def load_components(config: ModelConfig) -> Components:
    """Load the components of a pipeline folder or Hub id written by this project (or shaped like one)."""
    pipe = TextToImageDDPMPipeline.from_pretrained(
        config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant
    )
    scheduler = pipe.scheduler
    if scheduler.config.prediction_type != config.prediction_type:
        raise ValueError(
            f"model.prediction_type={config.prediction_type!r} but the base model "
            f"{config.pretrained_model_name_or_path!r} was trained with {scheduler.config.prediction_type!r}; "
            "set model.prediction_type to match it"
        )
    return Components(unet=pipe.unet, scheduler=scheduler, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
