"""The model, lora and textual_inversion sections: what is trained, and which of its parts."""

from dataclasses import dataclass, field
from typing import Literal

from .errors import _check


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
