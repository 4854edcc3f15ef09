"""Shared fixtures: tiny models built from config dicts and tiny datasets written on the fly."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Configs of the real bases, as published (tests/fixtures/README.md).
REAL_CONFIGS = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finetune.config import ModelConfig  # noqa: E402
from finetune.data import shapes  # noqa: E402
from finetune.models import build_components  # noqa: E402

TINY_MODEL = {
    "block_out_channels": [8, 16],
    "cross_attention_levels": [False, True],
    "num_attention_heads": 2,
    "norm_num_groups": 4,
    "text_hidden_size": 16,
    "text_layers": 1,
    "text_heads": 2,
    "max_caption_tokens": 10,
}

# Overrides that make a training run take seconds: the tiny model on 8 px images of a small built-in set.
TINY_RUN = [f"model.{k}={v}".replace("'", "").replace("False", "false").replace("True", "true")
            for k, v in TINY_MODEL.items()] + [
    "data.resolution=8",
    "data.num_samples=64",
    "data.shuffle_buffer=16",
    "train.train_batch_size=4",
    "train.learning_rate=1e-3",
    "train.lr_warmup_steps=0",
    "train.logging_steps=1",
    "validation.num_inference_steps=2",
    "validation.num_images_per_prompt=1",
    "validation.validation_steps=0",
]


@pytest.fixture
def tiny_components():
    torch.manual_seed(0)
    return build_components(ModelConfig(**TINY_MODEL), resolution=8, caption_texts=shapes.all_captions())


@pytest.fixture
def tiny_pipeline(tiny_components):
    pipe = tiny_components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards") / "shapes"
    shapes.write_shards(folder, 64, seed=0)
    return folder


def clip_tokenizer(folder: Path):
    """An offline CLIPTokenizer over single characters (every word is spelt out), padded to 77 tokens as
    Stable Diffusion's is: CLIP's real vocabulary needs a download."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_tiny_sd_pipeline(folder: Path):
    """A Stable-Diffusion-shaped pipeline (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer) with
    every width shrunk, built from config dicts, and SD-1.5's own scheduler: PNDM, with its config as published
    (tests/fixtures/sd15). 16 px images, 8 px latents."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / (folder.name + "-vocab"))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, layers_per_block=1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    scheduler = PNDMScheduler.from_pretrained(REAL_CONFIGS / "sd15", subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")
