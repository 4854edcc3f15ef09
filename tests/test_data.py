"""The built-in dataset generator, the stream that reads it, filters and bad data."""

import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import visualize
from finetune.cli import UserError
from finetune.config import ConfigError, DataConfig, FilterConfig
from finetune.data import ImageTextStream, WebDatasetSource, build_source, caption_texts, failed_filter, shapes
from finetune.data.transforms import decode_rgb, to_tensor, to_uint8, to_unit_range
from finetune.evaluate import judge
from finetune.models import build_tokenizer

from . import launch


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_generator_is_deterministic(tmp_path):
    a = shapes.write_shards(tmp_path / "a", 1200, seed=3)
    b = shapes.write_shards(tmp_path / "b", 1200, seed=3)
    c = shapes.write_shards(tmp_path / "c", 1200, seed=4)
    assert [p.name for p in a] == ["00000.tar", "00001.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()


def test_img2dataset_layout(tiny_shards):
    members = _members(tiny_shards / "00000.tar")
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == 64 and keys[0] == "000000000" and keys[-1] == "000000063"
    for key in keys:
        metadata = json.loads(members[f"{key}.json"])
        assert members[f"{key}.txt"].decode() == metadata["caption"]
        for field in ("caption", "width", "height", "similarity", "pwatermark", "punsafe", "aesthetic"):
            assert field in metadata
        image = Image.open(io.BytesIO(members[f"{key}.png"]))
        assert image.size == (metadata["width"], metadata["height"])


def test_content_follows_the_spec():
    samples = [shapes.render_sample(i, seed=0) for i in range(2000)]
    metadata = [m for _, _, m in samples]
    assert {m["color"] for m in metadata} == set(shapes.DEFAULT_COLORS)  # purple held out
    assert {m["shape"] for m in metadata} == set(shapes.SHAPES)
    assert len({caption for _, caption, _ in samples}) > 60  # the templates vary
    watermarked = [m["pwatermark"] > 0.8 for m in metadata]
    assert 0.03 < np.mean(watermarked) < 0.07
    assert max(m["pwatermark"] for m in metadata if m["pwatermark"] <= 0.8) < 0.5
    for png, caption, m in samples[:200]:
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
        if m["pwatermark"] < 0.5:
            assert corners.min() >= 230, caption  # a plain light background
        assert m["color"] in caption and m["shape"] in caption


def test_purple_on_request():
    _, caption, metadata = shapes.render_sample(0, seed=0, colors=("purple",))
    assert metadata["color"] == "purple" and "purple" in caption
    assert any("purple" in c for c in shapes.all_captions())


def test_judge_reads_the_training_images():
    """The evaluation's judge agrees with the generator's labels on its own images at 32 px."""
    verdicts = []
    for i in range(300):
        png, _, m = shapes.render_sample(i, seed=1, colors=tuple(shapes.HUES))
        image = np.asarray(Image.open(io.BytesIO(png)).resize((32, 32), Image.Resampling.BICUBIC))
        verdicts.append((judge(image), (m["color"], m["shape"])))
    assert np.mean([v[0][0] == v[1][0] for v in verdicts]) >= 0.99
    assert np.mean([v[0][1] == v[1][1] for v in verdicts]) >= 0.97
    assert judge(np.full((32, 32, 3), 240, np.uint8)) == (None, None)


def _stream(shards, rank=0, world_size=1, **overrides):
    config = DataConfig(source="webdataset", path=shapes.shard_pattern(shards, 64), resolution=8,
                        **{"shuffle_buffer": 16, **overrides})
    source = build_source(config, seed=0)
    tokenizer = build_tokenizer(caption_texts(config, source), 10)
    return ImageTextStream(source, config, tokenizer, seed=0, rank=rank, world_size=world_size)


def test_stream_reads_every_sample_once_per_epoch(tiny_shards):
    stream = _stream(tiny_shards, caption_dropout=0.0)
    examples = list(stream)
    assert sorted(e["key"] for e in examples) == [f"{i:09d}" for i in range(64)]
    assert examples[0]["pixel_values"].shape == (3, 8, 8) and examples[0]["pixel_values"].dtype == torch.uint8
    again = [e["key"] for e in stream]
    assert again == [e["key"] for e in examples]  # the same epoch gives the same order
    stream.set_epoch(1)
    assert [e["key"] for e in stream] != again  # a new epoch reshuffles


def test_processes_and_workers_read_disjoint_parts(tmp_path):
    """Each (process, worker) reader gets its own shards: together they see every sample exactly once."""
    shapes.write_shards(tmp_path, 4000, seed=0)  # 4 shards
    config = DataConfig(source="webdataset", path=shapes.shard_pattern(tmp_path, 4000), resolution=8,
                        caption_dropout=0.0, shuffle_buffer=8)
    source, tokenizer = build_source(config, seed=0), build_tokenizer(shapes.all_captions(), 10)
    seen = []
    for rank in range(2):
        stream = ImageTextStream(source, config, tokenizer, seed=0, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        seen.append([example["key"] for example in loader])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"{s:05d}{i:04d}" for s in range(4) for i in range(1000))


def test_too_few_shards_for_the_readers_is_an_error(tiny_shards):
    """A user's error (one line), raised when the stream is made, in the main process: from a dataloader worker it
    would reach the user inside a traceback."""
    with pytest.raises(UserError, match="1 shard\\(s\\) cannot be split over 2 readers"):
        _stream(tiny_shards, rank=1, world_size=2)


def test_resampled_shards_make_epochs_of_num_samples(tiny_shards):
    """A resampled stream never ends: each reader draws shards with replacement and stops at its share of
    data.num_samples (one shard of 64 samples; epochs of 100, so samples repeat)."""
    stream = _stream(tiny_shards, resampled=True, num_samples=100)
    keys = [e["key"] for e in stream]
    assert len(keys) == 100 and len(set(keys)) <= 64
    assert [e["key"] for e in stream] == keys  # the same epoch draws the same shards and order
    stream.set_epoch(1)
    assert [e["key"] for e in stream] != keys
    # Two processes, two dataloader workers each: 25 examples per reader, the shard shared by all (no split).
    for rank in range(2):
        loader = torch.utils.data.DataLoader(_stream(tiny_shards, rank, 2, resampled=True, num_samples=100),
                                             batch_size=None, num_workers=2)
        assert len(list(loader)) == 50


def test_resampled_stream_that_yields_nothing_stops(tiny_shards):
    stream = _stream(tiny_shards, resampled=True, num_samples=100, filters=FilterConfig(min_width=10**6))
    with pytest.raises(RuntimeError, match="10000 samples in a row gave no training example.*min_width"):
        next(iter(stream))


def test_resampled_stream_gives_up_on_shards_that_never_open(tmp_path):
    config = DataConfig(source="webdataset", path=str(tmp_path / "missing-{0..3}.tar"), resolution=8,
                        resampled=True, num_samples=100)
    stream = ImageTextStream(build_source(config, seed=0), config, build_tokenizer(shapes.all_captions(), 10), 0)
    with pytest.raises(RuntimeError, match="100 shards drawn in a row gave no sample"):
        next(iter(stream))


def test_a_large_shuffle_buffer_is_no_reason_to_give_up(tiny_shards):
    """The give-up count starts once the buffer is full: filling it yields nothing by design."""
    stream = _stream(tiny_shards, resampled=True, num_samples=40, shuffle_buffer=20_000)
    assert len(list(stream)) == 40


@pytest.mark.parametrize("overrides, message", [
    ({"source": "parquet", "path": "x", "resampled": True, "num_samples": 9}, "only webdataset shards are resampled"),
    ({"source": "webdataset", "path": "x", "resampled": True}, "needed with data.resampled: true"),
    ({"source": "webdataset", "path": "x", "num_samples": 9}, "set data.resampled: true"),
])
def test_epoch_length_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**overrides)


def test_builtin_folder_is_never_a_foreign_one(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not written by the built-in dataset generator"):
        shapes.ensure_shards(tmp_path / "mine", 64)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    pattern = shapes.ensure_shards(tmp_path / "gen", 64)
    first = (tmp_path / "gen" / "00000.tar").stat().st_mtime_ns
    assert shapes.ensure_shards(tmp_path / "gen", 64) == pattern
    assert (tmp_path / "gen" / "00000.tar").stat().st_mtime_ns == first  # the same set is reused
    shapes.ensure_shards(tmp_path / "gen", 80)  # a different set replaces it
    assert json.loads((tmp_path / "gen" / shapes.MARKER).read_text())["num_samples"] == 80


def test_caption_dropout(tiny_shards):
    stream = _stream(tiny_shards, caption_dropout=0.5)
    empty = stream.tokenize([""])[0]
    dropped = sum(bool((e["input_ids"] == empty).all()) for e in stream)
    assert 16 < dropped < 48


def test_repeated_captions_are_tokenised_once(tiny_shards, monkeypatch):
    """Each distinct caption goes through the tokenizer once, and every example gets the ids of its own caption:
    the same as a stream that tokenises every time. Past 10,000 remembered captions the memory starts again."""
    stream, fresh = _stream(tiny_shards, caption_dropout=0.5), _stream(tiny_shards, caption_dropout=0.5)
    monkeypatch.setattr(fresh, "token_ids", lambda caption: {"input_ids": fresh.tokenize([caption])[0]})  # no memory
    calls = []
    tokenize = stream.tokenize
    monkeypatch.setattr(stream, "tokenize",
                        lambda captions, which=0: calls.append(captions) or tokenize(captions, which))
    examples, expected = list(stream), list(fresh)
    assert [e["key"] for e in examples] == [e["key"] for e in expected]
    for example, reference in zip(examples, expected):
        assert torch.equal(example["input_ids"], reference["input_ids"]), example["key"]
    captions = [caption for (caption,) in calls]
    assert len(captions) == len(set(captions)) < len(examples) and "" in captions  # the built-in set repeats
    stream._token_ids.update({str(i): torch.zeros(1) for i in range(10_000)})
    stream.token_ids("a caption not seen")
    assert list(stream._token_ids) == ["a caption not seen"]


def test_watermark_filter(tiny_shards):
    stream = _stream(tiny_shards, filters=FilterConfig(max_pwatermark=0.5))
    kept = list(stream)
    assert stream.counts["dropped by max_pwatermark"] == 64 - len(kept) > 0
    assert failed_filter({"pwatermark": 0.9}, "x", FilterConfig(max_pwatermark=0.5)) == "max_pwatermark"
    assert failed_filter({}, "x", FilterConfig(max_pwatermark=0.5)) is None


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(good, format="PNG")
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for key, data, caption in [("a", good.getvalue(), "a red square"), ("b", b"not an image", "x"),
                                   ("c", good.getvalue()[:40], "truncated"), ("d", good.getvalue(), None)]:
            for ext, payload in [("png", data), ("txt", caption.encode() if caption else None)]:
                if payload is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    config = DataConfig(source="webdataset", path=str(tmp_path / "bad.tar"), resolution=8, caption_dropout=0.0,
                        max_bad_fraction=1.0)
    stream = ImageTextStream(WebDatasetSource(config.path, "caption"), config,
                             build_tokenizer(["a red square"], 8), seed=0)
    assert [e["key"] for e in stream] == ["a"]
    assert stream.counts["skipped: not an image"] == 2  # junk, and a PNG cut inside its header
    assert stream.counts["skipped: no caption"] == 1


def test_imagefolder_source(tmp_path):
    rows = []
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (20, 12), color).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {color} square"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = DataConfig(source="imagefolder", path=str(tmp_path), resolution=8, caption_dropout=0.0)
    source = build_source(config, seed=0)
    assert source.num_samples == 3
    stream = ImageTextStream(source, config, build_tokenizer(caption_texts(config, source), 8), seed=0)
    examples = list(stream)
    assert len(examples) == 3 and examples[0]["pixel_values"].shape == (3, 8, 8)
    bad = DataConfig(source="imagefolder", path=str(tmp_path), caption_column="caption")
    with pytest.raises(ValueError, match="data.caption_column"):
        build_source(bad, seed=0)


def test_decode_modes():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert decode_rgb(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    grey = io.BytesIO()
    Image.new("L", (4, 4), 100).save(grey, format="PNG")
    assert decode_rgb(grey.getvalue()).getpixel((0, 0)) == (100, 100, 100)
    tensor = to_tensor(Image.new("RGB", (40, 20), "white"), 8, True, False, random.Random(0))
    assert tensor.shape == (3, 8, 8) and float(tensor.min()) == 1.0


def test_pixels_travel_as_uint8_and_scale_exactly_as_float32_did():
    """The stream's pixels are uint8, scaled to [-1, 1] where they are used: bit for bit what the float32
    transform (numpy's x / 127.5 - 1) gave, for every value; anything but uint8 is refused, not scaled twice."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([values, values[::-1], values.T], axis=-1))
    pixels = to_uint8(image, 16, True, False, random.Random(0))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.equal(to_unit_range(pixels), expected) and torch.equal(visualize.to_pixels(pixels), expected)
    with pytest.raises(TypeError, match="expected uint8 pixels"):
        to_unit_range(expected)


def test_command_line_writes_the_set_anywhere(tmp_path):
    import sys

    result = launch.run([sys.executable, "-m", "finetune.data", str(tmp_path / "out"), "--num-samples", "12",
                         "--colors", "purple"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    members = _members(tmp_path / "out" / "00000.tar")
    captions = [v.decode() for k, v in members.items() if k.endswith(".txt")]
    assert len(captions) == 12 and all("purple" in c for c in captions)
