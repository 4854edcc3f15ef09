"""The run configuration: one typed dataclass per section, a strict YAML loader and dotted overrides.

A YAML file is an instance of `Config`; `section.key=value` on the command line overrides one leaf.
Every problem (unknown key, wrong type, value out of range) is collected and reported at once, before
anything is built.
"""

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..cli import UserError


class ConfigError(UserError, ValueError):
    """One or more problems with a config; the message lists them all (one alone on the same line)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config: " + problems[0] if len(problems) == 1 else
                         "invalid config:\n  - " + "\n  - ".join(problems))


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


@dataclass
class ModelConfig:
    """What is trained: a text-conditioned UNet, its text encoder, tokenizer and noise schedule; built from the
    fields below, or loaded from a pretrained pipeline (pixel space, or latent space with a VAE)."""

    pretrained_model_name_or_path: str | None = None
    """A pipeline folder or Hub id to start from: one this project trained (pixel space), a Stable-Diffusion-
    style one (`vae`, `unet`, `text_encoder`, `tokenizer`, `scheduler`; trained in the VAE's latent space) or an
    SDXL one (also `text_encoder_2`, `tokenizer_2`); or a single `.safetensors` checkpoint of SD-1.x or SDXL in the
    original layout, as model sites share them (converted offline to a diffusers folder once, kept in the cache).
    null builds every component from the fields below."""
    single_file_config: str | None = None
    """With a single-file base: a diffusers folder with its configs, tokenizers and scheduler (the base's own
    folder; its weights are not read). null: SD-1.5's or SDXL base 1.0's, which this package ships, told from the
    file's keys; SD-2.x files and fine-tunes with another architecture need it."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `pretrained_model_name_or_path`."""
    variant: str | None = None
    """Weight variant to load (e.g. fp16) from `pretrained_model_name_or_path`."""
    base_quantization: Literal["none", "int8", "fp8", "nf4"] = "none"
    """LoRA runs: hold the frozen base's linear layers (UNet and text encoders) quantized, the adapters in full
    precision: `int8` (torchao, int8 weight-only), `fp8` (torchao, float8 e4m3 weight-only), `nf4` (bitsandbytes'
    4-bit NormalFloat); `pip install 'finetune-ddpm[quantization]'`. The LoRA file is the same ordinary one."""
    use_safetensors: bool = True
    """Load the base's weights from `.safetensors` files only (a base with pickle-based `.bin` weights alone is
    refused). false also accepts `.bin` weights: loading a pickle can run code, so only for a base you trust."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """UNet channels per resolution level (from scratch)."""
    layers_per_block: int = 1
    """ResNet layers per UNet level (from scratch)."""
    cross_attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    """Per level, whether the UNet cross-attends to the text there (from scratch); same length as block_out_channels."""
    num_attention_heads: int = 2
    """Attention heads in the UNet's attention blocks (from scratch; diffusers calls this `attention_head_dim`).
    Few wide heads are much faster on CPU than many narrow ones."""
    only_cross_attention: bool = False
    """Attention blocks attend to the text only, without self-attention over pixels (from scratch); much
    cheaper at high resolutions."""
    text_time_embedding: bool = False
    """Also add an attention-pooled text embedding to the timestep embedding, so every ResNet block sees the
    caption (diffusers' `addition_embed_type="text"`; from scratch)."""
    norm_num_groups: int = 8
    """GroupNorm groups in the UNet; must divide every entry of block_out_channels (from scratch)."""
    text_hidden_size: int = 64
    """Width of the text encoder, which is also the UNet's cross-attention dimension (from scratch)."""
    text_layers: int = 2
    """Transformer layers in the text encoder (from scratch)."""
    text_heads: int = 4
    """Attention heads in the text encoder (from scratch)."""
    max_caption_tokens: int = 16
    """Captions are padded / truncated to this many tokens, including begin and end tokens (from scratch)."""
    train_text_encoder: bool = True
    """Train the text encoder (SDXL: both) with the UNet; false keeps it frozen."""
    num_train_timesteps: int = 1000
    """T, the number of forward-process steps (from scratch)."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    """Noise schedule of the forward process (from scratch)."""
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None
    """What the UNet learns to predict: the noise, the velocity, or the clean image. null: epsilon from scratch,
    the base's own when fine-tuning; a value switches a base to it (the exported scheduler says the same)."""
    rescale_betas_zero_snr: bool | None = None
    """Rescale the noise schedule to zero terminal SNR (Lin et al. 2023; pair it with v_prediction). null: off
    from scratch, the base's own when fine-tuning."""
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = None
    """How sampling spreads its steps over the T timesteps. null: from scratch `trailing` with a zero-terminal-SNR
    schedule (so the first step is t = T-1, where the model learnt pure noise: Lin et al. 2023, section 3.3) and
    `leading` otherwise; the base's own when fine-tuning. A value switches a base to it."""

    pretrained_vae_model_name_or_path: str | None = None
    """A VAE (folder or Hub id) to train and sample with in place of the base's own, e.g. an fp16-safe SDXL VAE
    (`madebyollin/sdxl-vae-fp16-fix`); a full fine-tune's pipeline is saved with it."""
    vae_upcast: bool | None = None
    """Keep the frozen VAE in float32 under mixed precision. null: for an SDXL base under fp16, as its VAE's config
    says (`force_upcast`: SDXL's own VAE overflows float16, the fp16-fixed ones do not); SD-1.x/2.x VAEs follow the
    training precision."""

    def __post_init__(self):
        problems = []
        for name in ("layers_per_block", "num_attention_heads", "norm_num_groups", "text_hidden_size", "text_layers",
                     "text_heads", "num_train_timesteps"):
            if getattr(self, name) < 1:
                problems.append(f"model.{name}: got {getattr(self, name)}; must be >= 1")
        if self.max_caption_tokens < 3:
            problems.append(f"model.max_caption_tokens: got {self.max_caption_tokens}; must be >= 3 "
                            "(begin token, at least one word, end token)")
        if self.pretrained_model_name_or_path is None and not problems:
            problems += self._architecture_problems()
        single = str(self.pretrained_model_name_or_path).lower().endswith(".safetensors")
        if single and (self.variant or self.revision):
            problems.append("model.variant / model.revision: a single-file base is one file, with no variants or Hub "
                            "revisions; remove them")
        if self.single_file_config and not single:
            problems.append(f"model.single_file_config: set, but model.pretrained_model_name_or_path="
                            f"{self.pretrained_model_name_or_path} is no .safetensors file; it is for single files")
        _check(problems)

    def _architecture_problems(self) -> list[str]:
        """Shape constraints between the from-scratch architecture fields (all counts already >= 1)."""
        problems = []
        if not self.block_out_channels or any(c <= 0 for c in self.block_out_channels):
            problems.append(f"model.block_out_channels: got {self.block_out_channels}; need positive integers")
        elif any(c % self.norm_num_groups for c in self.block_out_channels):
            problems.append(
                f"model.norm_num_groups: got {self.norm_num_groups}, which does not divide every entry of "
                f"model.block_out_channels={self.block_out_channels}; pick a common divisor"
            )
        if len(self.cross_attention_levels) != len(self.block_out_channels):
            problems.append(
                f"model.cross_attention_levels: got {len(self.cross_attention_levels)} entries but "
                f"model.block_out_channels has {len(self.block_out_channels)}; give one true/false per level"
            )
        if not any(self.cross_attention_levels):
            problems.append("model.cross_attention_levels: all false, so the text never reaches the UNet; "
                            "set at least one level to true")
        if self.text_hidden_size % self.text_heads:
            problems.append(f"model.text_heads: got {self.text_heads}, which does not divide "
                            f"model.text_hidden_size={self.text_hidden_size}")
        if any(c % self.num_attention_heads for c, a in zip(self.block_out_channels, self.cross_attention_levels)
               if a):
            problems.append(f"model.num_attention_heads: got {self.num_attention_heads}, which does not divide "
                            "the channels of every cross-attention level")
        return problems


@dataclass
class FilterConfig:
    """LAION metadata filters: a sample whose metadata fails one is dropped before decoding."""

    min_width: int | None = None
    """Drop images narrower than this (pixels)."""
    min_height: int | None = None
    """Drop images shorter than this (pixels)."""
    max_pwatermark: float | None = None
    """Drop samples whose watermark probability is above this."""
    max_punsafe: float | None = None
    """Drop samples whose NSFW probability is above this."""
    min_aesthetic: float | None = None
    """Drop samples whose aesthetic score is below this."""
    min_similarity: float | None = None
    """Drop samples whose CLIP image-text similarity is below this."""
    min_caption_chars: int | None = None
    """Drop samples whose caption is shorter than this many characters."""
    max_caption_chars: int | None = None
    """Drop samples whose caption is longer than this many characters."""
    on_missing: Literal["keep", "drop"] = "keep"
    """A sample whose metadata lacks a field that a set filter needs: `keep` it or `drop` it (counted)."""

    def __post_init__(self):
        problems = []
        for name in ("max_pwatermark", "max_punsafe"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                problems.append(f"data.filters.{name}: got {value}; must be a probability in [0, 1]")
        for name in ("min_width", "min_height", "min_caption_chars", "max_caption_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"data.filters.{name}: got {value}; must be >= 1")
        if (self.min_caption_chars or 0) > (self.max_caption_chars or float("inf")):
            problems.append(f"data.filters.min_caption_chars={self.min_caption_chars} is above "
                            f"max_caption_chars={self.max_caption_chars}: no caption could pass")
        _check(problems)


@dataclass
class DataConfig:
    """Where the image-text pairs come from and how they become tensors."""

    source: Literal["builtin", "webdataset", "imagefolder", "hf", "parquet"] = "builtin"
    """`builtin`: the rendered-shapes set (written on first use); `webdataset`: tar shards; `imagefolder`: a
    folder of images with `metadata.jsonl` / `metadata.csv` (the HF imagefolder layout) or with a `.txt` caption
    beside each image; `hf`: a HF datasets dataset (saved with `save_to_disk`, or a name for `load_dataset`);
    `parquet`: parquet files with image bytes (or paths) and captions."""
    path: str | None = None
    """builtin: the folder to write/read it (default: ~/.cache/finetune/shapes); webdataset: a shard path, brace
    pattern (`shards-{000000..000009}.tar`) or URL; imagefolder: the folder; hf: a saved dataset's folder or a
    dataset name; parquet: a file, a folder of `*.parquet` or a glob."""
    num_samples: int | None = None
    """builtin: how many samples to generate, the epoch length (null: 6000); webdataset / builtin with
    `resampled: true`: the training examples per epoch, over all processes (required there). Other sources
    have an epoch of one pass and take no number."""
    resampled: bool = False
    """webdataset / builtin: draw shards at random with replacement, endlessly (open_clip's
    `--dataset-resampled`): each reader draws its own shards, so an epoch is `num_samples` examples rather
    than one pass, and a sample may come twice in an epoch. For streams too large to finish an epoch."""
    colors: list[str] | None = None
    """builtin: the colours to draw (of red, orange, yellow, green, blue, purple; one listed twice is drawn twice
    as often); null: every colour but purple, which is held out for the LoRA fine-tuning demo."""
    cache: bool = False
    """Encode each image with the frozen VAE and each caption with the frozen text encoder once, keep the results
    in memory and train from them (the same training, without the repeated encoder passes). Needs centre crops
    (center_crop true); with random_flip each orientation is encoded once (a flipped image's latent is not the
    flipped latent). The text is cached only while the text encoder is frozen."""
    cache_dir: str | None = None
    """With `cache`: keep the encodings in this folder instead of in memory (one safetensors file per encoded image
    or caption, named by a hash of its pixels or token ids, under a folder per encoder's weights), so memory stays
    bounded at any dataset size and the next run on the same data and base reuses them. Each process writes its
    own; no sample keys needed (streamed data too)."""
    resolution: int = 32
    """Images are resized (shorter side) and cropped to this square size (with `buckets`, the side of the square
    whose area the buckets have)."""
    buckets: bool = False
    """Aspect-ratio buckets: each image goes to the bucket nearest its aspect ratio among those it contains
    (about resolution x resolution pixels; images are never enlarged), is resized to cover it and cropped
    minimally, and every batch holds images of one bucket. An image smaller than every bucket is dropped (counted,
    like a filter's drop; data.filters.min_width/min_height drop small images before decoding); a bucket's leftover
    images at the end of a finite epoch are dropped (counted). With several
    processes the data must be `resampled` (every reader then yields the same number of batches)."""
    bucket_sizes: list[list[int]] | None = None
    """The buckets, as [width, height] pairs (sides multiples of 8); null: for each height that is a multiple of
    `bucket_step`, the widest width (also a multiple) that keeps the area within resolution^2, sides at most 4:1,
    and the same lying down (at 1024 px, 17 buckets: 512x2048, 576x1792, ..., 1024x1024, ..., 2048x512)."""
    bucket_step: int = 64
    """The multiple that computed bucket sides are rounded down to (a multiple of 8, the VAE's factor)."""
    center_crop: bool = True
    """Crop the centre; false crops at a random position."""
    random_flip: bool = False
    """Flip half of the images horizontally."""
    masks: bool = False
    """Weight the loss per pixel by a mask: a `<key>.mask.png` beside the image in webdataset shards, else the
    image's own alpha channel (white / opaque counts fully, black / transparent by `train.unmasked_weight`); it
    is resized, cropped and flipped with its image. Images with neither train everywhere."""
    caption_dropout: float = 0.1
    """Share of captions replaced by the empty caption, so the model also learns the unconditional
    prediction that classifier-free guidance needs."""
    caption_prefix: str = ""
    """Put before every caption, with a space: an instance token ("sks dog"), a trigger word or a style tag."""
    caption_suffix: str = ""
    """Put after every caption, with a space."""
    shuffle_caption: bool = False
    """Shuffle a caption's comma-separated tags each time it is read (tag-style captions, as kohya's
    shuffle_caption), keeping the first `keep_tokens` tags (the prefix counts as the first) in place."""
    keep_tokens: int = 0
    """With shuffle_caption: how many leading comma-separated tags stay first."""
    default_caption: str | None = None
    """The caption of an image that has none (kohya's class_tokens: "sks dog" for a folder of one subject);
    null: such an image is skipped and counted as bad data."""
    caption_extension: str = ".txt"
    """imagefolder without a metadata file: the extension of the caption file beside each image (kohya's
    DreamBooth folders use `.caption`)."""
    caption_column: str = "text"
    """imagefolder / hf / parquet: the column holding the caption (a string or a list of them); webdataset: the
    json field used when a sample has no `.txt`."""
    image_column: str = "image"
    """hf / parquet: the column holding the image (bytes, an HF image, or a path). imagefolder metadata names each
    image in its `file_name` column."""
    split: str = "train"
    """hf: the split to train on."""
    streaming: bool = False
    """hf: stream the dataset instead of loading it (for sets larger than the disk or memory allows)."""
    shuffle_buffer: int = 1000
    """webdataset/builtin: samples held in the shuffle buffer."""
    num_workers: int = 0
    """DataLoader worker processes (0 decodes in the training process)."""
    persistent_workers: bool = False
    """Keep the DataLoader workers alive between epochs (saves their start-up each epoch)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """LAION metadata filters."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels than this (read from the header, before decoding) are skipped as decompression
    bombs; Pillow's own limit by default. Set higher, Pillow's limit is raised to it for these decodes only."""
    allow_outside_paths: bool = False
    """parquet / imagefolder: read image paths (in a parquet cell or the `file_name` of `metadata.jsonl` /
    `metadata.csv`) that lead outside the dataset's folder: absolute, climbing out with `..`, or through a
    symlink. Off by default because the data then chooses which files training reads, and a table from elsewhere
    could name any file this user can read; such a row is skipped with a warning and counted as a bad sample.
    Turn it on for trusted data whose images live elsewhere."""
    allow_pipe_urls: bool = False
    """webdataset: open `pipe:` shard URLs (`pipe:aws s3 cp s3://bucket/00000.tar -`), which webdataset runs as
    shell commands. Off by default because a data path (often pasted, generated or shared in a config) should not
    run commands on the training machines: a `pipe:` shard is then refused when the source is built. Turn it on
    for commands you wrote."""
    max_bad_fraction: float = 0.1
    """Stop with an error when more than this share of the samples read (after the first 100) is unreadable:
    a few bad samples are skipped, a broken dataset is not trained on."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Several datasets in one run, each a mapping of data-section keys of its own (`source` required; `path`,
    captions, filters, masks, crops; the others are inherited from this section) and how it takes part: `name`,
    `repeats` (passes an epoch) or `samples_per_epoch`, `loss_weight`, `is_regularisation`. Run-wide keys
    (resolution, buckets, cache, workers, shuffle buffer) stay in this section. The start-up summary gives each
    dataset's samples per epoch and the epoch's data counts give what each gave (`dataset <name>`)."""
    kohya_toml: str | None = None
    """A kohya sd-scripts dataset config (`[[datasets]]` / `[[datasets.subsets]]`) to read data.sources (and the
    resolution, buckets and batch size) from; the resolved config.yaml holds the result. Keys it cannot carry over
    are refused by name."""

    def __post_init__(self):
        problems = []
        if self.source != "builtin" and not self.path and not self.sources:
            problems.append(f"data.path: required when data.source={self.source!r}; give the shards, folder, files "
                            "or dataset name")
        if self.resolution < 8 or self.resolution % 8:
            problems.append(f"data.resolution: got {self.resolution}; must be a multiple of 8, at least 8")
        if self.max_image_pixels < 1 or not 0 <= self.max_bad_fraction <= 1:
            problems.append("data.max_image_pixels must be >= 1 and data.max_bad_fraction in [0, 1]")
        if not 0 <= self.caption_dropout < 1:
            problems.append(f"data.caption_dropout: got {self.caption_dropout}; must be in [0, 1)")
        if self.num_samples is not None and self.num_samples < 1:
            problems.append(f"data.num_samples: got {self.num_samples}; must be >= 1")
        if self.resampled and self.source not in ("webdataset", "builtin"):
            problems.append(f"data.resampled: only webdataset shards are resampled (got data.source={self.source!r})")
        if self.resampled and self.num_samples is None:
            problems.append("data.num_samples: needed with data.resampled: true (a resampled stream never ends, so "
                            "it sets the epoch length); e.g. the number of samples in the shards")
        if self.num_samples is not None and self.source != "builtin" and not self.resampled:
            problems.append(f"data.num_samples: an epoch of {self.source} data is one pass over it; remove "
                            "data.num_samples, or set data.resampled: true (webdataset) for epochs of that length")
        if self.shuffle_buffer < 0 or self.num_workers < 0:
            problems.append("data.shuffle_buffer and data.num_workers must be >= 0")
        if self.colors is not None:
            from ..data.shapes import HUES  # here, not at the top: the data package imports this module

            if not self.colors or any(c not in HUES for c in self.colors):
                problems.append(f"data.colors: got {self.colors}; give some of {', '.join(HUES)}")
            if self.source != "builtin":
                problems.append("data.colors: only the builtin source draws colours; remove it")
        if self.persistent_workers and not self.num_workers:
            problems.append("data.persistent_workers: true needs data.num_workers >= 1 (there are no workers to keep)")
        if self.source != "hf" and (self.streaming or self.split != "train"):
            problems.append(f"data.streaming / data.split: only data.source: hf reads them (got {self.source!r})")
        if self.allow_outside_paths and self.source not in ("parquet", "imagefolder"):
            problems.append(f"data.allow_outside_paths: only parquet and imagefolder data name image paths (got "
                            f"data.source={self.source!r}); remove it")
        if self.allow_pipe_urls and self.source != "webdataset":
            problems.append(f"data.allow_pipe_urls: only webdataset shards are opened by URL (got "
                            f"data.source={self.source!r}); remove it")
        if self.cache_dir and not self.cache:
            problems.append("data.cache_dir: set data.cache: true to use it, or remove it")
        if self.cache and self.streaming and not self.cache_dir:
            problems.append("data.cache: a streamed dataset has no stable sample keys to cache by in memory; set "
                            "data.cache_dir (the disk cache names images by their pixels), data.cache: false or "
                            "data.streaming: false")
        sizes = self.bucket_sizes or []
        if any(len(size) != 2 or min(size) < 8 or size[0] % 8 or size[1] % 8 for size in sizes):
            problems.append(f"data.bucket_sizes: got {self.bucket_sizes}; give [width, height] pairs whose sides are "
                            "multiples of 8 (the VAE's factor), at least 8")
        if self.bucket_step < 8 or self.bucket_step % 8:
            problems.append(f"data.bucket_step: got {self.bucket_step}; must be a multiple of 8 (the VAE's factor)")
        if self.buckets and not self.bucket_sizes and self.resolution < self.bucket_step:
            problems.append(f"data.bucket_step: {self.bucket_step} is more than data.resolution={self.resolution}, so "
                            "no bucket fits the area; lower data.bucket_step (a multiple of 8) or list "
                            "data.bucket_sizes")
        if (self.bucket_sizes is not None) and not self.buckets:
            problems.append("data.bucket_sizes: set data.buckets: true to use them, or remove them")
        if self.caption_extension != ".txt" and self.source != "imagefolder":
            problems.append(f"data.caption_extension: only imagefolder data without a metadata file reads caption "
                            f"files (got data.source={self.source!r}); remove it")
        if self.keep_tokens < 0 or not self.caption_extension.startswith("."):
            problems.append(f"data.keep_tokens (got {self.keep_tokens}) must be >= 0 and data.caption_extension (got "
                            f"{self.caption_extension!r}) start with a dot")
        if self.sources:
            from ..data.mixing import entries  # here, not at the top: the data package imports this module

            try:
                entries(self)
            except ConfigError as error:
                problems.extend(error.problems)
        if self.cache and not self.center_crop:
            problems.append("data.cache: the cache stores one encoding per image (and orientation), so random crops "
                            "would be frozen; set data.center_crop: true, or data.cache: false")
        _check(problems)


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the text-conditioning path: the UNet's cross-attention, optionally the text
    encoder. Saved as `output_dir/pytorch_lora_weights.safetensors` for diffusers' `load_lora_weights`."""

    enabled: bool = False
    """Train LoRA adapters (the base's weights stay frozen) instead of the full model."""
    type: Literal["lora", "dora", "locon", "loha", "lokr"] = "lora"
    """The adapter: `lora`; `dora` (the same as use_dora); `locon` (LoRA also on the UNet's ResNet convolutions,
    at lora.conv_rank); `loha` (LyCORIS' Hadamard product of two low-rank pairs) or `lokr` (LyCORIS' Kronecker
    product), peft's LoHa / LoKr, written in the LyCORIS layout ComfyUI, AUTOMATIC1111 and Forge load (stock
    diffusers cannot load them: this project's sample, evaluate and export can)."""
    rank: int = 4
    """Adapter rank r of the UNet's adapters."""
    alpha: float | None = None
    """Adapter scale numerator (scale = alpha / rank); null means alpha = rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training."""
    init: Literal["default", "gaussian"] = "default"
    """Adapter initialisation: `default` (A Kaiming-uniform, B zero) or `gaussian` (A normal with std 1/r);
    both start as the identity (B = 0)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"])
    """UNet modules that get adapters (peft matches name suffixes): by default the cross-attention projections
    where the text enters the UNet."""
    use_dora: bool = False
    """Weight-decomposed adapters (DoRA, Liu et al. 2024)."""
    conv_rank: int | None = None
    """Rank of the adapters on the UNet's ResNet convolutions (conv1, conv2, conv_shortcut): with `locon` (null: lora.
    rank), or to put LoHa / LoKr adapters there too (null: not on convolutions)."""
    conv_alpha: float | None = None
    """Scale numerator of the convolutions' adapters; null means alpha = conv_rank."""
    lokr_factor: int = -1
    """LoKr: the factor each dimension is split by for the Kronecker product (-1: as near its square root as
    divides it, LyCORIS' default); it must divide the adapted layers' dimensions."""
    train_text_encoder: bool = False
    """Also put adapters on the text encoder (model.train_text_encoder must then be false: the encoder's own
    weights stay frozen)."""
    text_encoder_rank: int = 4
    """Adapter rank of the text encoder's adapters."""
    text_encoder_alpha: float | None = None
    """Scale numerator of the text encoder's adapters; null means alpha = text_encoder_rank."""
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder modules that get adapters (CLIP attention projections by default)."""
    save_format: Literal["auto", "diffusers", "both"] = "auto"
    """`diffusers` writes pytorch_lora_weights.safetensors (diffusers' `load_lora_weights`); `both` also writes
    lora_kohya.safetensors in the kohya layout that ComfyUI, AUTOMATIC1111 and Forge load (`lora_unet_...`,
    `lora_te_...`, the real alpha, ss_* metadata; SDXL's UNet under its original LDM names); `auto` is `both` on an
    SD-1.x/2.x or SDXL base (on SDXL, while the adapters are in attention blocks) and `diffusers` otherwise (no
    other tool loads this project's own pixel-space models)."""

    def __post_init__(self):
        problems = []
        if self.type == "dora":
            self.use_dora = True
        elif self.use_dora and self.type != "lora":
            problems.append(f"lora.use_dora: DoRA is its own lora.type; with lora.type: {self.type} set it to false")
        if self.type in ("loha", "lokr"):
            if self.dropout:
                problems.append(f"lora.dropout: peft's {self.type} has no input dropout; set it to 0")
            if self.init != "default":
                problems.append(f"lora.init: peft's {self.type} has no gaussian initialisation; set it to default")
            if self.save_format == "diffusers":
                problems.append(f"lora.save_format: diffusers has no form for {self.type} (its loaders cannot load "
                                "it); use auto or both, the LyCORIS file ComfyUI, AUTOMATIC1111 and Forge load")
        if self.conv_rank is not None and self.conv_rank < 1 or self.conv_alpha is not None and self.conv_alpha <= 0:
            problems.append(f"lora.conv_rank / conv_alpha: got {self.conv_rank} / {self.conv_alpha}; must be >= 1 / "
                            "> 0, or null")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            problems.append(f"lora.lokr_factor: got {self.lokr_factor}; -1 (automatic) or a factor >= 1")
        if self.save_format == "both" and self.use_dora:
            problems.append("lora.save_format: both: a DoRA's magnitudes have no kohya form that ComfyUI, A1111 and "
                            "Forge read alike; use lora.save_format: diffusers with lora.use_dora")
        for name in ("rank", "text_encoder_rank"):
            if getattr(self, name) < 1:
                problems.append(f"lora.{name}: got {getattr(self, name)}; must be >= 1")
        for name in ("alpha", "text_encoder_alpha"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                problems.append(f"lora.{name}: got {getattr(self, name)}; must be > 0 or null")
        if not 0 <= self.dropout < 1:
            problems.append(f"lora.dropout: got {self.dropout}; must be in [0, 1)")
        for name in ("target_modules", "text_encoder_target_modules"):
            if not getattr(self, name) or not all(m.strip() for m in getattr(self, name)):
                problems.append(f"lora.{name}: got {getattr(self, name)}; give at least one module name")
        _check(problems)


@dataclass
class TrainConfig:
    """The optimisation: steps, batch, optimizer, precision, EMA, logging and checkpoints."""

    output_dir: str = "outputs/shapes"
    """Where the pipeline, checkpoints, samples, logs and the resolved config go."""
    seed: int = 0
    """Seeds weights, data order, noise and timesteps."""
    max_train_steps: int = 1200
    """Optimizer steps to train for."""
    train_batch_size: int = 32
    """Samples per process per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes accumulated into one optimizer step."""
    learning_rate: float = 1e-3
    """Peak learning rate (Prodigy: 1.0, a multiplier of the step size it finds itself)."""
    optimizer: Literal["adamw", "adamw_8bit", "prodigy", "adafactor", "adamw_schedulefree", "sgd"] = "adamw"
    """`adamw` (PyTorch's fused AdamW), `adamw_8bit` (bitsandbytes: CUDA, or CPU from bitsandbytes 0.50),
    `prodigy` (prodigyopt: finds its own step size; learning_rate 1.0), `adafactor` (PyTorch's: factored second
    moments, less memory), `adamw_schedulefree` (schedulefree: no LR schedule, an average of the weights is what is
    sampled and saved) or `sgd`. prodigy and adamw_schedulefree need `pip install 'finetune-ddpm[optimizers]'`."""
    optimizer_cpu_offload: bool = False
    """Keep AdamW's moments and the update on the CPU (torchao's `CPUOffloadOptimizer`): less GPU memory for a
    full fine-tune, at some speed; CUDA only, with train.optimizer: adamw (`pip install 'finetune-ddpm[quantization]'`
    brings torchao)."""
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments for the optimizer, e.g. `{momentum: 0.9}` for sgd or `{d_coef: 2, safeguard_warmup:
    true}` for prodigy; the adam_* fields below give betas, epsilon and weight decay to those that take them."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "cosine"
    """Learning-rate schedule (diffusers' get_scheduler)."""
    lr_warmup_steps: int = 100
    """Linear warm-up steps of the learning rate."""
    adam_beta1: float = 0.9
    """AdamW's decay rate of the gradient's running mean."""
    adam_beta2: float = 0.999
    """AdamW's decay rate of the squared gradient's running mean."""
    adam_weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW's epsilon, added to the denominator."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's choice); null weights every timestep
    equally."""
    noise_offset: float = 0.0
    """Add this much per-channel constant noise to the training noise (Guttenberg 2023), so the model can learn
    much darker or brighter images than the mean; 0.05-0.1 is typical, 0 disables."""
    unmasked_weight: float = 0.0
    """With data.masks: the loss weight of the pixels outside the mask (0 ignores them, 1 ignores the mask)."""
    normalize_mask_area: bool = True
    """With data.masks: divide each sample's per-pixel weights by their mean, so the loss keeps its scale however
    small the masked area (false: a small mask also makes a small loss)."""
    input_perturbation: float = 0.0
    """Perturb the noise that makes x_t (not the target) by this factor (Ning et al. 2023), against exposure bias;
    0.1 is the paper's value, 0 disables."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 disables clipping)."""
    on_nonfinite: Literal["error", "skip"] = "error"
    """A NaN/Inf loss or gradient norm on any process: stop with an error naming the step and batch (`error`),
    or skip that optimizer step on every process (`skip`)."""
    max_nonfinite_steps: int = 10
    """With on_nonfinite=skip, stop after this many non-finite steps in a row."""
    cpu_threads: int | None = None
    """Torch threads per process when training on CPU; null uses the machine's cores divided by the processes
    on it (`accelerate launch` otherwise leaves each process one thread)."""
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    """Autocast precision: `no` (fp32), `bf16` (recent GPUs; CPUs with AMX), `fp16` (GPUs only), `auto` (bf16 on
    GPUs that support it and on CPUs with AMX tiles, else fp32: CPUs with only AVX-512 BF16 run bf16 matmuls at
    half the fp32 speed, benchmarks/README.md)."""
    allow_tf32: bool = False
    """Let fp32 matmuls use TF32 tensor cores (Ampere and later GPUs; no effect on a CPU). cuDNN convolutions use
    TF32 either way, PyTorch's default."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory, slower steps."""
    enable_xformers_memory_efficient_attention: bool = False
    """xformers attention in the UNet (CUDA GPUs with xformers installed); PyTorch's SDPA is the default."""
    compile: bool = False
    """`torch.compile` the UNet (in place): faster steps after a compilation of a minute or more."""
    use_8bit_adam: bool = False
    """bitsandbytes' 8-bit AdamW (CUDA GPUs, or the CPU with bitsandbytes >= 0.50): a quarter of the optimizer
    memory; the same as `optimizer: adamw_8bit` (diffusers' name)."""
    use_ema: bool = True
    """Keep an exponential moving average of the trained weights and export it."""
    ema_max_decay: float = 0.999
    """Upper bound of the EMA decay (with warm-up, diffusers' EMAModel)."""
    logging_steps: int = 10
    """Log loss, learning rate, gradient norm and images/s to the trackers every this many steps."""
    report_to: str = "tensorboard"
    """Trackers for the logs and sample grids, through accelerate: `tensorboard` (in output_dir/logs), `wandb`,
    `mlflow`, `comet_ml`, `aim`, `clearml`, `dvclive`, `swanlab`, `trackio`, several joined by commas, `all`
    (every one installed) or `none`."""
    checkpointing_steps: int = 500
    """Save a resumable checkpoint every this many steps (0 disables)."""
    checkpoints_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed after a new one is complete)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder to resume from, or `latest` for the newest in output_dir."""
    export_single_file: bool = False
    """A full fine-tune of an SD-1.x or SDXL base also writes its pipeline as one `.safetensors` file in the original
    layout (`<output_dir>/<output folder name>.safetensors`), as ComfyUI, AUTOMATIC1111 and Forge load checkpoints."""
    single_file_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    """The precision of that file's weights (fp16: half the size, as checkpoints are shared)."""

    def __post_init__(self):
        problems = []
        unknown = [t for t in self.report_to.split(",") if t.strip() not in TRACKERS]
        if unknown:
            problems.append(f"train.report_to: got {self.report_to!r}; use {', '.join(TRACKERS)}, several joined by "
                            "commas")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "logging_steps",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                problems.append(f"train.{name}: got {getattr(self, name)}; must be >= 1")
        if self.learning_rate <= 0:
            problems.append(f"train.learning_rate: got {self.learning_rate}; must be > 0")
        if self.lr_warmup_steps < 0 or self.checkpointing_steps < 0 or self.max_grad_norm < 0:
            problems.append("train.lr_warmup_steps, train.checkpointing_steps and train.max_grad_norm must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"train.{name}: got {getattr(self, name)}; must be in [0, 1)")
        if self.adam_epsilon <= 0 or self.adam_weight_decay < 0:
            problems.append("train.adam_epsilon must be > 0 and train.adam_weight_decay >= 0")
        if not 0 <= self.unmasked_weight <= 1:
            problems.append(f"train.unmasked_weight: got {self.unmasked_weight}; must be in [0, 1]")
        if self.noise_offset < 0 or self.input_perturbation < 0:
            problems.append("train.noise_offset and train.input_perturbation must be >= 0")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append(f"train.snr_gamma: got {self.snr_gamma}; must be > 0 or null")
        if not 0 < self.ema_max_decay < 1:
            problems.append(f"train.ema_max_decay: got {self.ema_max_decay}; must be in (0, 1)")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            problems.append(f"train.cpu_threads: got {self.cpu_threads}; must be >= 1 or null")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            problems.append(f"train.checkpoints_total_limit: got {self.checkpoints_total_limit}; must be >= 1 or null")
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw_8bit"):
            problems.append(f"train.use_8bit_adam: true asks for adamw_8bit but train.optimizer is {self.optimizer}; "
                            "keep one of them")
        if self.optimizer_cpu_offload and (self.max_grad_norm > 0 or self.mixed_precision == "fp16"):
            problems.append("train.optimizer_cpu_offload: its optimizer copies each gradient to the CPU during the "
                            "backward pass, before gradient clipping or fp16's unscaling could reach it; set "
                            "train.max_grad_norm: 0 (and bf16 rather than fp16), or optimizer_cpu_offload: false")
        if self.optimizer_cpu_offload and (self.optimizer != "adamw" or self.use_8bit_adam):
            problems.append(f"train.optimizer_cpu_offload: offloads train.optimizer: adamw only (got "
                            f"{'adamw_8bit' if self.use_8bit_adam else self.optimizer}); use adamw, or set it to false")
        if self.optimizer == "adamw_schedulefree":
            if self.lr_scheduler != "constant":
                problems.append(f"train.lr_scheduler: {self.lr_scheduler} would fight adamw_schedulefree, which "
                                "replaces the schedule (its warm-up is train.lr_warmup_steps); set train.lr_scheduler: "
                                "constant")
            if self.use_ema:
                problems.append("train.use_ema: adamw_schedulefree already averages the weights (that average is "
                                "what is sampled and saved); set train.use_ema: false")
        _check(problems)


@dataclass
class ValidationPrompt:
    """A validation prompt with sampling settings of its own; a setting left out (null) is the section's."""

    prompt: str = ""
    """The prompt."""
    negative_prompt: str | None = None
    """What guidance steers away from (with guidance_scale > 1), in place of the empty prompt."""
    seed: int | None = None
    """The seed of this prompt's row."""
    guidance_scale: float | None = None
    """Classifier-free guidance weight of this prompt's row."""

    def __post_init__(self):
        problems = []  # (an empty prompt: ValidationConfig names it)
        if self.guidance_scale is not None and self.guidance_scale < 0:
            problems.append(f"validation.prompts: {self.prompt!r} has guidance_scale {self.guidance_scale}; must be "
                            ">= 0")
        _check(problems)


@dataclass
class ValidationConfig:
    """Sample grids drawn during training, saved under output_dir/samples/ and logged to tensorboard."""

    prompts: list[str | ValidationPrompt] = field(
        default_factory=lambda: ["a red circle", "a green square", "a blue triangle"])
    """Prompts to sample, one grid row each: a text, or `{prompt: ..., negative_prompt: ..., seed: ...,
    guidance_scale: ...}` for a row with settings of its own (those left out are this section's)."""
    validation_steps: int = 300
    """Sample every this many steps (0: only after the last step)."""
    num_images_per_prompt: int = 4
    """Images per prompt (grid columns)."""
    num_inference_steps: int = 50
    """Reverse steps per sample."""
    guidance_scale: float = 1.0
    """Classifier-free guidance weight (1 disables guidance)."""
    seed: int = 0
    """Seed of the sampling noise, the same at every validation so grids are comparable."""
    loss_samples: int = 0
    """Held-out image-text pairs to measure the validation loss on at each validation and at the end (0: none): the
    objective at 10 fixed timesteps with fixed noise, as `python -m finetune.evaluate` measures it (logged as
    validation_loss and validation_loss_t<t>). The built-in set's held-out pairs are new renderings; other data
    name theirs in loss_data."""
    loss_data: dict[str, Any] = field(default_factory=dict)
    """The held-out data, as data-section keys in place of the run's (e.g. {path: "val/{000000..000001}.tar"});
    read in order, centre-cropped, unflipped."""
    compare_with_base: bool = True
    """A fine-tune of a base draws the base's own grid once, before the first step (samples/base.png), and logs
    every later grid beside it (validation/vs_base)."""
    process_strips: bool = True
    """Also draw the diffusion process at each validation: the reverse process for the first prompt (x_t and the
    predicted x_0 at 6 steps) and, once, the forward process on a training image (samples/process/)."""

    def __post_init__(self):
        problems = []
        if not self.prompts or not all(text.strip() for text in self.texts):
            problems.append(f"validation.prompts: got {self.texts!r}; give at least one non-empty prompt (a row with "
                            "settings of its own: `{prompt: <text>, seed: ...}`)")
        if self.validation_steps < 0:
            problems.append(f"validation.validation_steps: got {self.validation_steps}; must be >= 0")
        if self.num_images_per_prompt < 1 or self.num_inference_steps < 1:
            problems.append("validation.num_images_per_prompt and validation.num_inference_steps must be >= 1")
        if self.guidance_scale < 0:
            problems.append(f"validation.guidance_scale: got {self.guidance_scale}; must be >= 0")
        if self.loss_samples < 0:
            problems.append(f"validation.loss_samples: got {self.loss_samples}; must be >= 0 (0: no validation loss)")
        _check(problems)

    @property
    def texts(self) -> list[str]:
        """The prompts' texts, one per grid row."""
        return [p if isinstance(p, str) else p.prompt for p in self.prompts]

    @property
    def per_prompt(self) -> bool:
        """Whether any row has settings of its own (each row is then sampled on its own)."""
        return any(isinstance(p, ValidationPrompt) for p in self.prompts)

    def rows(self) -> list[ValidationPrompt]:
        """Every row with its settings resolved: its own, else this section's."""
        rows = [p if isinstance(p, ValidationPrompt) else ValidationPrompt(p) for p in self.prompts]
        return [ValidationPrompt(r.prompt, r.negative_prompt, self.seed if r.seed is None else r.seed,
                                 self.guidance_scale if r.guidance_scale is None else r.guidance_scale) for r in rows]


@dataclass
class HubConfig:
    """Publishing the result to the Hugging Face Hub. The token comes from `HF_TOKEN` or `hf auth login`, never
    from the config, so it is never written to the output folder."""

    push_to_hub: bool = False
    """Upload output_dir (with a generated model card) at the end of training."""
    hub_model_id: str | None = None
    """The repository to push to (`user/name`, or `name` under the token's account); needed to push."""
    private: bool = False
    """Create the repository as private (an existing repository keeps its visibility)."""
    revision: str | None = None
    """The branch to push to, created from main when missing; null: main."""
    push_checkpoints: bool = False
    """Also upload each checkpoint (`checkpoint-<step>/`) as it is written; the final push includes them."""
    license: str | None = None
    """The model card's `license` (e.g. apache-2.0, or the base's, such as creativeml-openrail-m); null: none."""

    def __post_init__(self):
        problems = []
        if self.push_to_hub and not self.hub_model_id:
            problems.append("hub.hub_model_id: needed with hub.push_to_hub: true; give the repository, e.g. "
                            "your-name/shapes-ddpm")
        if self.push_checkpoints and not self.push_to_hub:
            problems.append("hub.push_checkpoints: only works with hub.push_to_hub: true")
        if self.hub_model_id is not None and not _REPO_ID.fullmatch(self.hub_model_id):
            problems.append(f"hub.hub_model_id: got {self.hub_model_id!r}; expected `user/name` or `name` (letters, "
                            "digits, '-', '_', '.'; at most 96 characters per part)")
        _check(problems)


@dataclass
class PriorConfig:
    """DreamBooth's prior preservation: while a few images teach a subject, keep what the model draws for its class
    (the names are diffusers' train_dreambooth options)."""

    mode: Literal["none", "class_images", "base_prediction"] = "none"
    """`class_images`: the base draws num_class_images images of class_prompt before the first step (cached: a
    rerun draws none) and they train beside the data as regularisation images; `base_prediction`: each batch also
    trains under class_prompt with the frozen base's own prediction as the target (LoRA runs; no images)."""
    class_prompt: str = ""
    """The class the subject belongs to, e.g. "a photo of a dog" (the instance captions then name the subject with
    a rare token: data.caption_prefix: "sks")."""
    prior_loss_weight: float = 1.0
    """How much the class images' (or the base's predictions') loss weighs against the instance images'."""
    num_class_images: int = 100
    """class_images: how many the base draws."""
    class_data_dir: str | None = None
    """class_images: where they are kept, in a folder named by a hash of the base's weights and the settings that
    shape them (null: the finetune cache, ~/.cache/finetune/class-images)."""
    negative_prompt: str = ""
    """class_images: the negative prompt they are drawn with."""
    num_inference_steps: int = 25
    """class_images: the sampler's steps for each."""
    guidance_scale: float = 7.5
    """class_images: the guidance they are drawn with."""
    seed: int = 0
    """class_images: image i is drawn from a generator seeded seed + i (the same images however many processes)."""
    sample_batch_size: int = 4
    """class_images: images drawn at once per process."""

    def __post_init__(self):
        problems = []
        if self.mode != "none" and not self.class_prompt.strip():
            problems.append(f"prior.class_prompt: needed with prior.mode: {self.mode}; name the subject's class, e.g. "
                            "\"a photo of a dog\"")
        if not self.prior_loss_weight >= 0:
            problems.append(f"prior.prior_loss_weight: got {self.prior_loss_weight}; must be >= 0")
        if min(self.num_class_images, self.num_inference_steps, self.sample_batch_size) < 1 or self.guidance_scale < 0:
            problems.append("prior.num_class_images, num_inference_steps and sample_batch_size must be >= 1, "
                            "prior.guidance_scale >= 0")
        _check(problems)


@dataclass
class TextualInversionConfig:
    """New tokens whose embeddings train (textual inversion, Gal et al. 2022): alone (lora.enabled: false; nothing
    else trains) or beside a LoRA (pivotal tuning: both throughout). The names are diffusers' textual_inversion
    options."""

    placeholder_tokens: list[str] = field(default_factory=list)
    """The new tokens, e.g. ["<sks>"]; write them in the captions (data.caption_prefix: "<sks>") and prompts."""
    initializer_tokens: list[str] = field(default_factory=list)
    """One word per placeholder whose embedding (the mean of its tokens') each of its vectors starts from."""
    num_vectors: int = 1
    """Vectors per placeholder: `<sks>` becomes the tokens `<sks> <sks>_1 ...`, as diffusers' loader names them."""
    train_fraction: float = 1.0
    """Pivotal tuning: the embeddings train for this share of train.max_train_steps, then stay as they are while the
    LoRA goes on (diffusers' train_text_encoder_ti_frac). Below 1 it needs train.optimizer adamw or prodigy, which
    count their steps in their (checkpointed) state."""

    def __post_init__(self):
        problems = []
        if len(self.initializer_tokens) != len(self.placeholder_tokens):
            problems.append(f"textual_inversion.initializer_tokens: got {len(self.initializer_tokens)} for "
                            f"{len(self.placeholder_tokens)} placeholder_tokens; give one word per placeholder")
        if any(not t or any(c.isspace() for c in t) for t in self.placeholder_tokens + self.initializer_tokens) \
                or len(set(self.placeholder_tokens)) < len(self.placeholder_tokens):
            problems.append("textual_inversion.placeholder_tokens / initializer_tokens: non-empty, without spaces, "
                            "each placeholder once")
        if self.num_vectors < 1:
            problems.append(f"textual_inversion.num_vectors: got {self.num_vectors}; must be >= 1")
        from ..embeddings import file_name  # (it imports this module)

        files = [file_name(token) for token in self.placeholder_tokens]
        if len(set(files)) < len(files):
            problems.append(f"textual_inversion.placeholder_tokens: {self.placeholder_tokens} would share a file name "
                            f"({', '.join(files)}); make them differ in letters or digits")
        if not 0 < self.train_fraction <= 1:
            problems.append(f"textual_inversion.train_fraction: got {self.train_fraction}; must be in (0, 1]")
        _check(problems)

    @property
    def enabled(self) -> bool:
        return bool(self.placeholder_tokens)

    def until(self, max_train_steps: int) -> int | None:
        """The optimizer steps the embeddings train for; None: all of them."""
        return None if self.train_fraction == 1 else max(1, round(self.train_fraction * max_train_steps))


TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "all",
            "none")
_REPO_ID = re.compile(r"([A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)

    def __post_init__(self):
        problems = []
        if self.textual_inversion.enabled and (not self.model.pretrained_model_name_or_path
                                               or self.model.train_text_encoder):
            problems.append("textual_inversion.placeholder_tokens: new tokens are learnt for a base's frozen text "
                            "encoder; set model.pretrained_model_name_or_path and model.train_text_encoder: false")
        if self.textual_inversion.train_fraction < 1 and (not self.lora.enabled or self.train.optimizer not in (
                "adamw", "prodigy") or self.train.use_8bit_adam or self.train.optimizer_cpu_offload):
            problems.append("textual_inversion.train_fraction below 1 is pivotal tuning's: it needs lora.enabled: true "
                            "and train.optimizer adamw or prodigy (without use_8bit_adam or optimizer_cpu_offload), "
                            "whose state counts the steps")
        if self.textual_inversion.enabled and (self.train.optimizer == "adamw_schedulefree"
                                               or self.train.optimizer_cpu_offload):
            problems.append("train.optimizer: textual inversion puts the base's rows back after every step, which "
                            "adamw_schedulefree's averaged weights and optimizer_cpu_offload's wrapper do not see; use "
                            "adamw, prodigy, adafactor or sgd, without optimizer_cpu_offload")
        if self.textual_inversion.enabled and self.hub.push_to_hub:
            problems.append("hub.push_to_hub: the model card does not describe textual-inversion embeddings yet; set "
                            "it to false and share <token>.safetensors with `hf upload`")
        if self.textual_inversion.enabled and not self.lora.enabled and self.train.use_ema:
            problems.append("train.use_ema: textual inversion alone keeps no EMA of its embeddings; set it to false")
        if self.prior.mode != "none" and not self.model.pretrained_model_name_or_path:
            problems.append(f"prior.mode: {self.prior.mode} keeps what a base draws for the class; fine-tune a base "
                            "(model.pretrained_model_name_or_path), or set prior.mode: none")
        if self.prior.mode == "class_images" and self.model.pretrained_model_name_or_path:
            from ..prior import with_class_images  # (it imports this module)

            try:  # the data with the class images added is checked now, not after they are drawn
                with_class_images(self.data, Path("class-images"), self.prior, None)
            except ConfigError as error:
                problems.extend(error.problems)
        masks = self.data.masks or any(entry.get("masks") for entry in self.data.sources)
        if self.prior.mode == "base_prediction" and (not self.lora.enabled or self.lora.train_text_encoder
                                                     or masks):
            problems.append("prior.mode: base_prediction takes the base's prediction with the UNet's adapters off, "
                            "so it needs lora.enabled: true, a frozen text encoder (lora.train_text_encoder: false) "
                            "and no data.masks; or use prior.mode: class_images")
        if self.validation.num_inference_steps > self.model.num_train_timesteps:
            problems.append(f"validation.num_inference_steps: got {self.validation.num_inference_steps}, more than "
                            f"model.num_train_timesteps={self.model.num_train_timesteps}; use at most that many")
        if self.lora.enabled and self.model.train_text_encoder:
            problems.append("model.train_text_encoder: a LoRA run keeps the base's weights frozen; set it to false "
                            "(lora.train_text_encoder: true puts adapters on the text encoder instead)")
        if self.lora.enabled and not self.model.pretrained_model_name_or_path:
            problems.append("lora.enabled: adapters fine-tune a trained base; set model.pretrained_model_name_or_path "
                            "(e.g. outputs/shapes, written by configs/shapes.yaml)")
        if self.model.base_quantization != "none" and not self.lora.enabled:
            problems.append(f"model.base_quantization: {self.model.base_quantization} quantizes a frozen base, which "
                            "only a LoRA run has; set lora.enabled: true, or base_quantization: none")
        if self.model.base_quantization == "nf4" and self.lora.type in ("loha", "lokr"):
            problems.append(f"model.base_quantization: nf4 cannot carry lora.type: {self.lora.type} (peft sizes its "
                            "factors from the packed 4-bit weights); use int8 or fp8, or lora.type: lora")
        if self.validation.loss_data:
            try:
                held_out = held_out_section(self.data, self.validation.loss_data)
                if self.data.sources:
                    from ..data.mixing import entries  # (the data package imports this module)

                    sections = [section for section, _ in entries(self.data)]
                else:
                    sections = [self.data]
                if any(s.source != "builtin" and all(getattr(held_out, f) == getattr(s, f)
                                                     for f in ("source", "path", "split")) for s in sections):
                    problems.append("validation.loss_data: it names the training data itself (the same source, path "
                                    "and split); name held-out pairs, e.g. {path: val/{000000..000001}.tar}")
            except ConfigError as error:
                problems.extend(error.problems)
        if self.validation.loss_samples and (self.data.source != "builtin" or self.data.sources) \
                and not self.validation.loss_data:
            problems.append("validation.loss_samples: with your own data, name the held-out pairs in "
                            "validation.loss_data (e.g. {path: val/{000000..000001}.tar}); the run's own data would "
                            "not be held out")
        if self.train.export_single_file and (self.lora.enabled or not self.model.pretrained_model_name_or_path):
            problems.append("train.export_single_file: only a full fine-tune of an SD-1.x or SDXL base has a "
                            "single-file form (a LoRA run writes lora_kohya.safetensors, which those tools load); "
                            "set it to false" + ("" if self.lora.enabled else
                                                 ", or fine-tune a base (model.pretrained_model_name_or_path)"))
        _check(problems)


def held_out_section(data: DataConfig, loss_data: dict) -> DataConfig:
    """The held-out data of `validation.loss_data`: the run's data section with those keys in place (checked as the
    data section is; a ConfigError names `validation.loss_data.<key>`), read once over, never resampled."""
    if data.sources and "source" not in loss_data:
        raise ConfigError(["validation.loss_data.source: with data.sources the held-out data names its own source "
                           "(and path), e.g. {source: imagefolder, path: val}"])
    merged = {**dataclasses.asdict(data), "sources": [], "kohya_toml": None, **loss_data}
    if merged.get("source") != "builtin":
        merged.update(resampled=False, num_samples=None)
    problems: list[str] = []
    held_out = _build(DataConfig, merged, "validation.loss_data", problems)
    _check(problems)
    return held_out


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# ---- loading -------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where a float is wanted)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        structured = [a for a in inner if dataclasses.is_dataclass(a)]
        if structured and isinstance(value, dict):  # e.g. a validation prompt with settings of its own
            return _build(structured[0], value, key, problems)
        return _convert(value, inner[0], key, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: got {value!r}; allowed: {', '.join(repr(a) for a in args)}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: got {value!r} ({type(value).__name__}); expected a mapping, {{name: value}}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: got {value!r} ({type(value).__name__}); expected a list of {_type_name(args[0])}")
            return value
        return [_convert(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string; it is clearly a number
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        problems.append(f"{key}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
    return value


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from the mapping `raw`, appending every problem found to `problems`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'config'}: got {raw!r}; expected a mapping of keys to values")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            where = f" in {prefix}" if prefix else ""
            problems.append(f"{dotted}: unknown key; " + (f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
                            if close else f"valid keys{where}: {', '.join(names)}"))
            continue
        before = len(problems)
        converted = _convert(value, hints[key], dotted, problems)
        if len(problems) == before:  # keep only well-typed values, so range checks still run on them
            kwargs[key] = converted
    try:
        return cls(**kwargs)
    except ConfigError as error:
        problems.extend(error.problems)
        return cls()


def _field_type(parts: list[str]) -> Any:
    """The annotation of the config field at `parts` (e.g. ["train", "mixed_precision"]), or None if there is none."""
    tp = Config
    for part in parts:
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _parse_override(text: str, tp: Any) -> Any:
    """A value typed on the command line: YAML (`1e-4`, `true`, `[32, 64]`, `null`), except for a text field (a
    string, or a choice of strings), which takes the text as written: `train.mixed_precision=no` is "no", not YAML
    1.1's false, and `data.path=shards-{000..009}.tar` is a path, not a mapping."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    inner = [a for a in args if a is not type(None)]
    text_field = len(inner) == 1 and (inner[0] is str or typing.get_origin(inner[0]) is Literal
                                      and all(isinstance(a, str) for a in typing.get_args(inner[0])))
    if text_field and not (type(None) in args and text.strip() in ("null", "~", "")):
        return text
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides, each value read for its field's type (`_parse_override`)."""
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep or "." not in dotted:
            raise ConfigError([f"override {item!r}: expected section.key=value, e.g. train.max_train_steps=100"])
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {part} is not a section"])
        node[leaf] = _parse_override(text, _field_type([*parents, leaf]))
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate everything."""
    raw = {}
    if path is not None and not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        there = sorted(n for n in os.listdir(folder) if n.endswith((".yaml", ".yml"))) if os.path.isdir(folder) else []
        raise ConfigError([f"--config {path}: no such file" + (f"; in {folder}: {', '.join(there)}" if there else "")])
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    raw = apply_overrides(raw, list(overrides))
    if isinstance(raw.get("data"), dict) and raw["data"].get("kohya_toml"):
        from ..data.kohya_toml import expand  # (the data package imports this module)

        raw = expand(raw)
    problems: list[str] = []
    config = _build(Config, raw, "", problems)
    _check(problems)
    return config


def config_yaml(config: Config) -> str:
    """The resolved config as YAML text; it loads back to an equal Config."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (`config_yaml`) to `path`."""
    with open(path, "w") as f:
        f.write(config_yaml(config))
