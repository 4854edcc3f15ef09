"""Shared fixtures: tiny models built from config dicts and tiny datasets written on the fly."""

import json
import os
import socket
import sys
import time
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


def build_sd15_shaped(folder: Path) -> Path:
    """SD-1.5's UNet, VAE and text encoder configs as published (tests/fixtures/sd15), widths shrunk (layers, blocks
    and activations as they are), with SD-1.5's scheduler."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def config(name: str) -> dict:
        return {k: v for k, v in json.loads((REAL_CONFIGS / "sd15" / name / "config.json").read_text()).items()
                if not k.startswith("_")}

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / (folder.name + "-vocab"))
    unet = UNet2DConditionModel(**{**config("unet"), "block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4,
                                   "attention_head_dim": 2, "cross_attention_dim": 16, "sample_size": 8})
    vae = AutoencoderKL(**{**config("vae"), "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4,
                           "layers_per_block": 1, "sample_size": 64})
    text = config("text_encoder")
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**{k: text[k] for k in ("hidden_act", "max_position_embeddings",
                                                                           "num_hidden_layers", "layer_norm_eps")},
                                                   "hidden_size": 16, "intermediate_size": 32,
                                                   "num_attention_heads": 2, "vocab_size": len(tokenizer),
                                                   "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}))
    scheduler = PNDMScheduler.from_pretrained(REAL_CONFIGS / "sd15", subfolder="scheduler")
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def _scaled(config: dict, **sizes) -> dict:
    """A real base's config with only its sizes replaced (every other key, behaviour included, as published; not the
    dtype the weights were stored in, which transformers would build the tiny model in)."""
    return {k: v for k, v in {**config, **sizes}.items() if not k.startswith("_") and k != "torch_dtype"}


def build_tiny_sdxl_pipeline(folder: Path, real_depths: bool = False):
    """An SDXL-shaped pipeline built from SDXL base 1.0's own configs (tests/fixtures/sdxl): its UNet (text_time
    embedding, linear projections, per-level heads and transformer depths), VAE (scaling 0.13025, force_upcast),
    CLIP-L and OpenCLIP-G-shaped text encoders (quick_gelu / gelu, the second with a projection), two CLIP tokenizers
    (the second pads with "!"), EulerDiscreteScheduler and model_index flags; only widths, depths and sizes shrunk.
    Tokenizers spell words out letter by letter, their special tokens last, as in CLIP's vocabulary (the pooled
    output is read at the highest id, the end token). The encoders differ in width (16 and 24), as CLIP-L's 768 and
    OpenCLIP-G's 1280 do: loaders that tell them apart by width are exercised. 16 px images, 8 px latents.
    `real_depths`: SDXL's own layer and block counts (2 ResNets per level, 1/2/10 transformer blocks, 12- and
    32-layer encoders), widths shrunk."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    real = REAL_CONFIGS / "sdxl"

    def config(part: str) -> dict:
        return json.loads((real / part / "config.json").read_text())

    torch.manual_seed(0)
    vocab_folder = folder.parent / (folder.name + "-vocab")
    vocab_folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*chars, *(c + "</w>" for c in chars), "!", "<|startoftext|>", "<|endoftext|>"]
    (vocab_folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (vocab_folder / "merges.txt").write_text("#version: 0.2\n")
    files = (str(vocab_folder / "vocab.json"), str(vocab_folder / "merges.txt"))
    tokenizer = CLIPTokenizer(*files, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(*files, model_max_length=77, pad_token="!")
    ids = {"vocab_size": len(tokens), "bos_token_id": len(tokens) - 2, "eos_token_id": len(tokens) - 1}
    depth = {} if real_depths else {"num_hidden_layers": 2}
    text_encoder = CLIPTextModel(CLIPTextConfig(**_scaled(
        config("text_encoder"), hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=16,
        pad_token_id=len(tokens) - 1, **depth, **ids)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_scaled(  # wider than the first, as OpenCLIP-G is
        config("text_encoder_2"), hidden_size=24, intermediate_size=48, num_attention_heads=2, projection_dim=16,
        pad_token_id=len(tokens) - 3, **depth, **ids)))
    vae = AutoencoderKL(**_scaled(config("vae"), block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  sample_size=16))
    depth = {} if real_depths else {"layers_per_block": 1, "transformer_layers_per_block": [1, 1, 2]}
    unet = UNet2DConditionModel(**_scaled(
        config("unet"), sample_size=8, block_out_channels=[8, 16, 32], norm_num_groups=4, attention_head_dim=[2, 2, 4],
        cross_attention_dim=16 + 24, addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        addition_embed_type_num_heads=2, **depth))
    scheduler = EulerDiscreteScheduler.from_pretrained(real, subfolder="scheduler")
    index = json.loads((real / "model_index.json").read_text())
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=index["force_zeros_for_empty_prompt"],
                                     add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def wait_for_port(port: int, process, log: Path | None = None, timeout: float = 60) -> None:
    """Until something listens on 127.0.0.1:`port`; `process` (what should) must stay alive meanwhile (its `log`
    says why not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None, log.read_text() if log else f"exited with {process.returncode}"
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")
