"""How text becomes the UNet's conditioning, per model family: the one place where SD-1.x/2.x (and this project's
pixel-space models) and SDXL differ in training. The loop asks `text_conditioning(components)` for an object with
the list of its `encoders` and three methods, and reads the same for every base:

- `ids(batch)`: one row of token ids per sample (the cache key of its embeddings);
- `embed(ids, device)`: the frozen or training encoders' outputs for those rows, a tuple of tensors;
- `unet_kwargs(embeds, batch, device)`: the UNet's keyword arguments besides the noisy sample and timestep.

SD-1.x/2.x: the text encoder's last hidden state. SDXL (Podell et al. 2023, sections 2.1-2.2), as its own pipeline
encodes a prompt: the penultimate hidden states of CLIP-L (`text_encoder`) and OpenCLIP-G (`text_encoder_2`)
concatenated, OpenCLIP-G's pooled projection, and the six micro-conditioning numbers (original size, crop top-left,
target size) of each sample, from the data. An empty caption (caption dropout, or data without one) is SDXL's
unconditional input: both embeddings zero, as the pipeline makes them for classifier-free guidance (when the base's
`force_zeros_for_empty_prompt` is true, as SDXL base's is).
"""

import torch

from .cli import UserError
from .embeddings import expand


class OneEncoder:
    """SD-1.x/2.x and this project's pixel-space models: `encoder_hidden_states` is the last hidden state."""

    def __init__(self, text_encoder):
        self.text_encoder, self.encoders, self.zeros_for_empty = text_encoder, [text_encoder], None

    def ids(self, batch: dict) -> torch.Tensor:
        return batch["input_ids"]

    def embed(self, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor]:
        return (self.text_encoder(ids.to(device), return_dict=False)[0],)

    def unet_kwargs(self, embeds: tuple, batch: dict, device: torch.device) -> dict:
        return {"encoder_hidden_states": embeds[0]}


class TwoEncodersXL:
    """SDXL: two encoders, the pooled embedding and the size-and-crop time ids (`added_cond_kwargs`)."""

    def __init__(self, text_encoder, text_encoder_2, tokenizer, tokenizer_2, zeros_for_empty: bool = True):
        self.text_encoder, self.text_encoder_2, self.zeros_for_empty = text_encoder, text_encoder_2, zeros_for_empty
        self.encoders = [text_encoder, text_encoder_2]
        self.split = tokenizer.model_max_length
        self.empty = torch.cat([tokenize(tokenizer, [""])[0], tokenize(tokenizer_2, [""])[0]])

    def ids(self, batch: dict) -> torch.Tensor:
        return torch.cat([batch["input_ids"], batch["input_ids_2"]], dim=1)

    def embed(self, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = ids.to(device)
        first = self.text_encoder(ids[:, :self.split], output_hidden_states=True)
        second = self.text_encoder_2(ids[:, self.split:], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        if not self.zeros_for_empty:  # (a base whose pipeline encodes "" for its unconditional input)
            return hidden, pooled
        keep = (ids != self.empty.to(device)).any(dim=1)  # an empty caption: zeros, SDXL's unconditional input
        return hidden * keep[:, None, None].to(hidden.dtype), pooled * keep[:, None].to(pooled.dtype)

    def unet_kwargs(self, embeds: tuple, batch: dict, device: torch.device) -> dict:
        hidden, pooled = embeds
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids(batch, device, hidden.dtype)}}


def time_ids(batch: dict, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning per sample: (original height, width, crop top, left, target height, width), the
    original size being the image file's and the crop the offset of the training crop in the resized image, as
    SDXL was trained (the pipeline passes the same six numbers, default (H, W, 0, 0, H, W))."""
    pixels = batch["pixel_values"]
    target = torch.tensor(pixels.shape[-2:]).expand(pixels.shape[0], 2)
    return torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).to(device, dtype)


def check_size(components, data) -> None:
    """An SDXL base trains on square crops only at its own size (the UNet's sample size times the VAE's factor:
    1024 px for SDXL base): at another square size its size conditioning would describe pictures it never saw.
    Other sizes go through aspect-ratio buckets, whose time ids say what each picture is."""
    if components.text_encoder_2 is None or data.buckets:
        return
    native = components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)
    if data.resolution != native:
        raise UserError(f"data.resolution: {data.resolution} px square crops on an SDXL base made for {native} px; "
                        f"set data.resolution: {native}, or data.buckets: true (images of every aspect ratio at "
                        f"about {data.resolution}x{data.resolution} pixels, their sizes and crops passed to the UNet)")


def freeze_unused(components) -> None:
    """SDXL reads CLIP-L at its penultimate layer, so its last layer and final layer norm never get a gradient:
    freeze them (adapters on them included), or several processes' DDP would wait forever for their gradients and a
    LoRA file would carry adapters that never trained. OpenCLIP-G's last layer makes the pooled embedding: it trains."""
    if components.text_encoder_2 is None:
        return
    text_model = getattr(components.text_encoder, "text_model", components.text_encoder)  # (transformers 5: flat)
    for module in (text_model.encoder.layers[-1], text_model.final_layer_norm):
        module.requires_grad_(False)


def text_conditioning(components) -> OneEncoder | TwoEncodersXL:
    if components.text_encoder_2 is None:
        return OneEncoder(components.text_encoder)
    return TwoEncodersXL(components.text_encoder, components.text_encoder_2, components.tokenizer,
                         components.tokenizer_2, components.force_zeros_for_empty_prompt)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded (and truncated) to the tokenizer's length, as the pipelines tokenize prompts (a
    textual-inversion placeholder of several vectors spelt out into its tokens, as they do)."""
    return tokenizer(expand(tokenizer, captions), padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
