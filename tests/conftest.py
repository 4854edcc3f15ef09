"""Shared fixtures: tiny models built from config dicts and tiny datasets written on the fly."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
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
