"""How much of a real SDXL training step a cache of latents and text embeddings can remove, counted in FLOPs.

SDXL base 1.0's real configs (tests/fixtures/sdxl, from the shared real-configs) built on the meta device, so
nothing is computed or downloaded: torch's FlopCounterMode counts the matmuls and convolutions of the VAE's encoder
on an image, both text encoders on 77 tokens, and the UNet's forward and backward on the latents, for a full
fine-tune (weight gradients) and for LoRA (frozen weights; the gradient still flows back through every block to
reach the adapters, counted here as the gradient to the input). The bound a cache can reach, when the step is
compute-bound, is (encoders + VAE + UNet) / UNet. Elementwise work (norms, activations, the optimizer) is not
counted.

    python benchmarks/sdxl_flops.py [--resolution 1024] [--json benchmarks/results/sdxl-flops.json]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parent.parent
SDXL = ROOT / "tests" / "fixtures" / "sdxl"


def teraflops(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e12


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL / "text_encoder")),
                    CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL / "text_encoder_2"))]
        side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        ids = torch.zeros(1, 77, dtype=torch.long)
        images = torch.zeros(1, 3, args.resolution, args.resolution)
        latents = torch.zeros(1, unet.config.in_channels, side, side)
        hidden = torch.zeros(1, 77, unet.config.cross_attention_dim)
        added = {"text_embeds": torch.zeros(1, encoders[1].config.projection_dim), "time_ids": torch.zeros(1, 6)}
        timestep = torch.tensor([500])

    with torch.no_grad():
        text = teraflops(lambda: [encoder(ids, output_hidden_states=True) for encoder in encoders])
        vae_encode = teraflops(lambda: vae.encode(images))
        unet_forward = teraflops(lambda: unet(latents, timestep, hidden, added_cond_kwargs=added))
    full = teraflops(lambda: unet(latents, timestep, hidden, added_cond_kwargs=added).sample.sum().backward())
    unet.requires_grad_(False)
    flowing = latents.clone().requires_grad_(True)
    lora = teraflops(lambda: unet(flowing, timestep, hidden, added_cond_kwargs=added).sample.sum().backward())

    report = {
        "what": "TFLOPs per image of one SDXL base 1.0 training step's parts (meta device, torch FlopCounterMode)",
        "resolution": args.resolution, "torch": torch.__version__,
        "text_encoders_forward": round(text, 3), "vae_encode": round(vae_encode, 3),
        "unet_forward": round(unet_forward, 3), "unet_forward_backward_full": round(full, 3),
        "unet_forward_backward_lora": round(lora, 3),
        "cache_bound_full": round((full + vae_encode + text) / full, 3),
        "cache_bound_lora": round((lora + vae_encode + text) / lora, 3),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
