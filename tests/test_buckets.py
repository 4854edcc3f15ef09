"""Aspect-ratio buckets: images of every shape trained at about one area, each batch of one bucket, with the crop
and original size reaching SDXL's micro-conditioning, the same number of batches in every process, exact resume."""

import io
import json
import os
import random

import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from finetune.config import ConfigError, DataConfig, load_config
from finetune.data import ImageTextStream, build_source
from finetune.data.transforms import bucket_sizes, crop_to, nearest_bucket
from finetune.families import time_ids
from finetune.models import build_tokenizer

from .test_train import _train

SHAPES = {"wide": (64, 16), "square": (32, 32), "tall": (16, 64), "tiny": (8, 8)}  # width, height


def test_computed_buckets_keep_the_area_and_the_step():
    sizes = bucket_sizes(1024, 64)
    assert len(sizes) == 17 and (1024, 1024) in sizes and (832, 1216) in sizes and (1216, 832) in sizes
    assert sizes[0] == (512, 2048) and sizes[-1] == (2048, 512)
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0 and width * height <= 1024 * 1024
        assert 1 / 4 <= width / height <= 4 and (height, width) in sizes
    assert len({h for _, h in sizes}) == len(sizes)  # one bucket per height (the widest)
    assert bucket_sizes(16, 8) == [(8, 32), (16, 16), (32, 8)]


def test_each_image_goes_to_the_nearest_bucket_it_contains():
    sizes = bucket_sizes(1024, 64)
    assert nearest_bucket((1000, 1500), sizes) == (832, 1216)
    assert nearest_bucket((3000, 2000), sizes) == (1216, 832)
    assert nearest_bucket((1024, 1024), sizes) == (1024, 1024)
    assert nearest_bucket((500, 500), sizes) is None  # smaller than every bucket: never enlarged
    pixels, (top, left), *_ = crop_to(Image.new("RGB", (1000, 1500)), (832, 1216), True, False, random.Random(0))
    assert pixels.shape == (3, 1216, 832) and (top, left) == (16, 0)  # 832 x 1248 after resizing


@pytest.mark.parametrize("overrides, key", [
    (["data.buckets=true", "data.bucket_sizes=[[512, 500]]"], "data.bucket_sizes"),
    (["data.buckets=true", "data.bucket_step=12"], "data.bucket_step"),
    (["data.bucket_sizes=[[512, 512]]"], "data.bucket_sizes: set data.buckets: true"),
])
def test_bucket_settings_that_cannot_work_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def _images(folder, counts: dict[str, int]):
    """An imagefolder with `counts[shape]` images of each shape in SHAPES, each with its own caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, colours = [], ["red", "green", "blue", "white", "black", "yellow"]
    for shape, count in counts.items():
        for i in range(count):
            name = f"{shape}-{i}.png"
            Image.new("RGB", SHAPES[shape], colours[i % len(colours)]).save(folder / name)
            rows.append({"file_name": name, "text": f"a {colours[i % len(colours)]} {shape} picture"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return folder


def _tokenizer():
    return build_tokenizer([f"a {c} {s} picture" for c in ("red", "green", "blue", "white", "black", "yellow")
                            for s in SHAPES], 8)


def test_every_batch_holds_one_bucket(tmp_path):
    folder = _images(tmp_path / "images", {"wide": 6, "square": 5, "tall": 3, "tiny": 1})
    data = DataConfig(source="imagefolder", path=str(folder), resolution=16, buckets=True, bucket_step=8,
                      caption_dropout=0.0)
    stream = ImageTextStream(build_source(data, 0), data, _tokenizer(), seed=0, batch_size=2)
    batches = list(stream)
    shapes = [tuple(batch["pixel_values"].shape) for batch in batches]
    assert sorted(shapes) == [(2, 3, 8, 32)] * 3 + [(2, 3, 16, 16)] * 2 + [(2, 3, 32, 8)]
    for batch in batches:  # the keys say which shape each image had
        assert len({key.split("-")[0] for key in batch["key"]}) == 1
    wide = next(b for b in batches if b["pixel_values"].shape[-1] == 32)
    assert time_ids(wide, torch.device("cpu"), torch.float32).tolist()[0] == [16, 64, 0, 0, 8, 32]
    counts = stream.counts
    assert counts["bucket 32x8"] == 6 and counts["bucket 16x16"] == 4 and counts["bucket 8x32"] == 2
    assert counts["dropped: a bucket's partial batch at the end of the epoch"] == 2
    assert counts["dropped: smaller than every bucket"] == 1


def _shards(folder, count: int):
    """Webdataset shards of images of three shapes in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=count // 2) as sink:
        for i in range(count):
            shape = ("wide", "square", "tall")[i % 3]
            buffer = io.BytesIO()
            Image.new("RGB", SHAPES[shape], "red").save(buffer, format="PNG")
            sink.write({"__key__": f"{i:05d}", "png": buffer.getvalue(), "txt": f"a red {shape} picture"})
    return f"{folder}/{{00000..00001}}.tar"


def test_every_process_reads_the_same_number_of_batches(tmp_path):
    """With resampled shards each reader yields num_samples // (readers x batch) batches, whatever the buckets."""
    pattern = _shards(tmp_path / "shards", 30)
    data = DataConfig(source="webdataset", path=pattern, resampled=True, num_samples=40, resolution=16,
                      buckets=True, bucket_step=8, shuffle_buffer=4)
    lengths = []
    for rank in (0, 1):
        stream = ImageTextStream(build_source(data, 0), data, _tokenizer(), seed=0, rank=rank, world_size=2,
                                 batch_size=3)
        for epoch in (0, 1):
            stream.set_epoch(epoch)
            batches = list(stream)
            assert all(len({tuple(x.shape) for x in b["pixel_values"]}) == 1 for b in batches)
            lengths.append(len(batches))
    assert lengths == [40 // 2 // 3] * 4


@pytest.mark.slow
def test_a_bucketed_run_resumes_exactly(tmp_path):
    """Images of three shapes in three buckets, random crops and flips: a run resumed from its step-3 checkpoint
    ends with the weights of the run that never stopped (the batches follow from the data order alone)."""
    folder = _images(tmp_path / "images", {"wide": 8, "square": 8, "tall": 8})
    common = ["data.source=imagefolder", f"data.path={folder}", "data.num_samples=null", "data.resolution=16",
              "data.buckets=true", "data.bucket_step=8", "data.center_crop=false", "data.random_flip=true",
              "train.max_train_steps=8", "train.checkpointing_steps=3", "train.use_ema=false"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = _train(tmp_path, *common, f"train.output_dir={full}")
    assert "in 3 aspect-ratio buckets (8x32, 16x16, 32x8)" in result.stdout
    resumed.mkdir()
    os.symlink(full / "checkpoint-3", resumed / "checkpoint-3")
    _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    a = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_buckets_with_several_processes_need_resampled_data(tmp_path):
    from types import SimpleNamespace

    from finetune.cli import UserError
    from finetune.train import build_data

    folder = _images(tmp_path / "images", {"wide": 2})
    config = load_config(None, ["data.source=imagefolder", f"data.path={folder}", "data.num_samples=null",
                                "data.buckets=true", "data.resolution=16", "data.bucket_step=8"])
    accelerator = SimpleNamespace(num_processes=2, process_index=0, is_main_process=False)
    with pytest.raises(UserError, match="data.buckets with several processes needs data.resampled: true"):
        build_data(config, SimpleNamespace(tokenizers=[_tokenizer()]), build_source(config.data, 0), accelerator)
