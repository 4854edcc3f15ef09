"""Bad data never crashes a run and never becomes a wrong sample: each kind is skipped and counted by reason."""

import io
import json
import logging
import random
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from finetune.config import DataConfig, FilterConfig
from finetune.data import ImageTextStream, WebDatasetSource, failed_filter, pick_caption
from finetune.data.transforms import PILLOW_LIMIT, ImageTooLarge, decode_rgb
from finetune.models import build_tokenizer


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _stream(path: str, **config) -> ImageTextStream:
    """A stream over `path`; these small sets are mostly bad on purpose, so no bad-fraction limit unless given."""
    config = {"max_bad_fraction": 1.0, **config}
    config = DataConfig(source="webdataset", path=path, resolution=8, caption_dropout=0.0, shuffle_buffer=0, **config)
    return ImageTextStream(WebDatasetSource(config.path, "caption"), config, build_tokenizer(["a red square"], 8), 0)


RED = _encode(Image.new("RGB", (16, 16), "red"))
RANDOM = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))


def _sample(key, image=RED, caption: str | None = "a red square", metadata: dict | None = None):
    members = [] if image is None else [(f"{key}.png", image)]
    members += [] if caption is None else [(f"{key}.txt", caption.encode())]
    return members + ([] if metadata is None else [(f"{key}.json", json.dumps(metadata).encode())])


def test_every_kind_of_bad_sample_is_skipped_and_counted_exactly(tmp_path):
    members = [
        *_sample("good-0"), *_sample("good-1"),
        *_sample("not-an-image", image=b"<html>404</html>"),
        *_sample("truncated", image=RANDOM[: len(RANDOM) // 2]),
        *_sample("too-large", image=_encode(Image.new("RGB", (100, 100), "red"))),
        *_sample("no-image", image=None),
        *_sample("no-caption", caption=None),
        *_sample("empty-caption", caption=""),
        *_sample("blank-caption", caption="  \n"),
        *_sample("huge-caption", caption="red " * 50_000),
        *_sample("../../escape"),  # a name that tries to leave the folder: just a key, never a path
        *_sample("small", image=_encode(Image.new("RGB", (10, 10))), metadata={"width": 500, "height": 500}),
    ]
    outside = tmp_path.parent / "escape.png"  # where "../../escape" would land if a key became a path
    stream = _stream(_write_tar(tmp_path / "bad.tar", members), max_image_pixels=5000,
                     filters=FilterConfig(max_caption_chars=1000, min_width=12))
    keys = [example["key"] for example in stream]
    assert keys == ["good-0", "good-1", "../../escape"]
    assert dict(stream.counts) == {
        "used": 3, "skipped: not an image": 1, "skipped: truncated image": 1, "skipped: image too large": 1,
        "skipped: no image": 1, "skipped: no caption": 3, "dropped by max_caption_chars": 1,
        "dropped by min_width/min_height (decoded size)": 1,
    }
    assert not outside.exists()


def test_a_truncated_tar_keeps_what_came_before_the_cut(tmp_path):
    path = _write_tar(tmp_path / "whole.tar", [m for i in range(6) for m in _sample(f"k{i}")])
    data = open(path, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 3])
    stream = _stream(str(cut))
    keys = [example["key"] for example in stream]
    assert 0 < len(keys) < 6 and keys == [f"k{i}" for i in range(len(keys))]
    assert stream.counts["skipped: unreadable shard data"] >= 1


def test_too_many_bad_samples_stop_the_run_with_the_reason(tmp_path):
    members = [m for i in range(20) for m in _sample(f"bad{i}", image=b"junk")]
    members += [m for i in range(90) for m in _sample(f"good{i}")]
    with pytest.raises(RuntimeError, match=r"20 of the 110 samples read so far are unreadable.*max_bad_fraction=0.1"):
        list(_stream(_write_tar(tmp_path / "bad.tar", members), max_bad_fraction=0.1))
    assert len(list(_stream(_write_tar(tmp_path / "bad.tar", members), max_bad_fraction=0.25))) == 90


def test_image_modes_become_the_right_rgb():
    assert decode_rgb(_encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)))).getpixel((0, 0)) == (255, 255, 255)
    assert decode_rgb(_encode(Image.new("RGBA", (4, 4), (255, 0, 0, 255)))).getpixel((0, 0)) == (255, 0, 0)
    assert decode_rgb(_encode(Image.new("LA", (4, 4), (0, 0)))).getpixel((0, 0)) == (255, 255, 255)
    assert decode_rgb(_encode(Image.new("L", (4, 4), 100))).getpixel((0, 0)) == (100, 100, 100)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert decode_rgb(_encode(palette)).getpixel((0, 0)) == (0, 0, 255)
    palette.info["transparency"] = 1
    assert decode_rgb(_encode(palette, transparency=1)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = decode_rgb(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)).getpixel((0, 0))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # cyan 0, magenta and yellow full: red
    sixteen = Image.fromarray(np.full((4, 4), 257 * 200, dtype=np.uint16))
    assert decode_rgb(_encode(sixteen)).getpixel((0, 0)) == (200, 200, 200)


@pytest.mark.parametrize("kind", ["JPEG", "TIFF", "PNG"])
@pytest.mark.parametrize("min_size", [None, 4])
def test_exif_rotated_images_are_turned_upright(kind, min_size):
    """Upright pixels and size (the size filters judge `source_size`: before a JPEG's reduced-scale decode), for a
    JPEG, a PNG, and a TIFF (which Pillow 13 turns upright itself when it opens and loads it)."""
    image = Image.new("RGB", (20, 10), "white")  # stored landscape, red on the left
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright = decode_rgb(_encode(image, kind, exif=exif, **({"quality": 95} if kind == "JPEG" else {})),
                         min_size=min_size)
    assert upright.info["source_size"] == (10, 20)
    width, height = upright.size
    assert height == 2 * width and (width == 10 or kind == "JPEG" and min_size)  # (a JPEG may decode smaller)
    top, bottom = upright.getpixel((width // 2, height // 5)), upright.getpixel((width // 2, height * 4 // 5))
    assert top[1] < 80 and bottom[1] > 200  # the red half ends up on top


def test_decompression_bombs_are_refused_by_max_image_pixels_from_the_header(tmp_path, caplog):
    """A 10000 x 5000 PNG of zeros is 6 kB on disk and 150 MB decoded. It is under Pillow's own limit, so only
    data.max_image_pixels (10 M here) refuses it, and from the header: the same file cut inside its pixel data is
    "too large" as well, not "truncated"."""
    bomb = _encode(Image.new("1", (10000, 5000)), optimize=True)
    assert len(bomb) < 10_000 and 10_000_000 < 10000 * 5000 < Image.MAX_IMAGE_PIXELS
    members = _sample("bomb", image=bomb) + _sample("cut", image=bomb[: len(bomb) // 2]) + _sample("fine")
    stream = _stream(_write_tar(tmp_path / "bomb.tar", members), max_image_pixels=10_000_000)
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        assert [e["key"] for e in stream] == ["fine"]
    assert dict(stream.counts) == {"used": 1, "skipped: image too large": 2}
    assert "'cut' (image too large, 2 so far): image of 10000x5000 pixels exceeds data.max_image_pixels" in caplog.text


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_max_image_pixels_above_pillows_limit_is_honoured(tmp_path, monkeypatch, num_workers):
    """data.max_image_pixels above Pillow's own limit (lowered to 1000 pixels here, so that small images stand for
    huge ones): an image between the two, which Pillow alone refuses, decodes (in dataloader workers too); one
    above ours is still refused; and Pillow's limit is its own again afterwards."""
    import torch

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    between = _encode(Image.new("RGB", (60, 60), "red"))  # 3,600 pixels: over twice Pillow's 1000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(between))
    _write_tar(tmp_path / "0.tar", _sample("between", image=between))  # a shard per worker
    _write_tar(tmp_path / "1.tar", _sample("above", image=_encode(Image.new("RGB", (80, 80)))))
    stream = _stream(str(tmp_path / "{0..1}.tar"), max_image_pixels=5000)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    assert [example["key"] for example in loader] == ["between"]
    counts = stream.collect_counts(num_workers) if num_workers else stream.counts
    assert dict(counts) == {"used": 1, "skipped: image too large": 1}
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(Image.DecompressionBombError):  # nothing else gets the raised limit
        Image.open(io.BytesIO(between))


def test_overlapping_raises_of_pillows_limit_may_end_in_any_order(monkeypatch):
    """Decodes that raise Pillow's limit overlap and end in any order, as in threads: while any runs the limit is
    the largest of theirs (a later one that needs less than the raised value but more than Pillow's own counts
    too), and once all have ended it is Pillow's own again."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    small, large = PILLOW_LIMIT.at_least(5000), PILLOW_LIMIT.at_least(20_000)
    small.__enter__()
    large.__enter__()
    assert Image.MAX_IMAGE_PIXELS == 20_000
    small.__exit__(None, None, None)
    assert Image.MAX_IMAGE_PIXELS == 20_000
    with PILLOW_LIMIT.at_least(3000):
        large.__exit__(None, None, None)
        assert Image.MAX_IMAGE_PIXELS == 3000
    assert Image.MAX_IMAGE_PIXELS == 1000
    with PILLOW_LIMIT.at_least(500):  # under Pillow's own limit: nothing to raise
        assert Image.MAX_IMAGE_PIXELS == 1000


def _pillow_limit_after_a_decode() -> int:
    decode_rgb(_encode(Image.new("RGB", (40, 40))), max_pixels=3000)
    return Image.MAX_IMAGE_PIXELS


def test_a_forked_worker_keeps_no_raise_of_a_thread_it_left_behind(monkeypatch):
    """A dataloader worker forked while another thread has Pillow's limit raised: that thread's decode never ends
    in the worker, so the worker's limit must be Pillow's own again, not raised for good."""
    import multiprocessing

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with PILLOW_LIMIT.at_least(5000), multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_pillow_limit_after_a_decode) == 1000
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillows_limit_raised_in_several_threads_at_once(monkeypatch):
    """Decodes with different limits in four threads at once, all above Pillow's (lowered to 1000 pixels): each
    decode is judged by its own limit every time, however they interleave, and Pillow's limit is its own again at
    the end. Opening sleeps a moment so that the threads interleave inside each other's decodes."""
    import threading
    import time

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image = _encode(Image.new("RGB", (60, 60), "red"))  # 3,600 pixels
    open_image = Image.open
    monkeypatch.setattr(Image, "open", lambda *args: time.sleep(0.0005) or open_image(*args))

    start = threading.Barrier(4)

    def decode(limit: int) -> set:
        outcomes = set()
        start.wait()
        for _ in range(300):
            try:
                outcomes.add(decode_rgb(image, limit).size)
            except (ImageTooLarge, Image.DecompressionBombError) as error:
                outcomes.add(type(error).__name__)
        return outcomes

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(decode, [5000, 2000, 20_000, 3600]))
    assert outcomes == [{(60, 60)}, {"ImageTooLarge"}, {(60, 60)}, {(60, 60)}]
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_filters_on_missing_fields_and_caption_length():
    needs = FilterConfig(min_aesthetic=5.0)
    assert failed_filter({}, "a caption", needs) is None
    dropping = FilterConfig(min_aesthetic=5.0, on_missing="drop")
    assert failed_filter({}, "a caption", dropping) == "min_aesthetic (missing)"
    assert failed_filter({"aesthetic": "n/a"}, "x", FilterConfig(min_aesthetic=5.0, on_missing="drop")) is not None
    assert failed_filter({"aesthetic": 6.0}, "x", FilterConfig(min_aesthetic=5.0, on_missing="drop")) is None
    assert failed_filter({}, "ab", FilterConfig(min_caption_chars=3)) == "min_caption_chars"
    assert failed_filter({}, "abcd", FilterConfig(max_caption_chars=3)) == "max_caption_chars"
    assert failed_filter({"width": 10, "height": 300}, "x", FilterConfig(min_width=64, min_height=64)) == "min_width"


def test_filter_counts_are_exact(tmp_path):
    metadata = [{"aesthetic": 4.0, "punsafe": 0.1}, {"aesthetic": 6.0, "punsafe": 0.1}, {"aesthetic": 6.0},
                {"aesthetic": 7.0, "punsafe": 0.9}]
    members = [m for i, meta in enumerate(metadata) for m in _sample(f"k{i}", metadata=meta)]
    stream = _stream(_write_tar(tmp_path / "f.tar", members),
                     filters=FilterConfig(min_aesthetic=5.0, max_punsafe=0.5, on_missing="drop"))
    assert [e["key"] for e in stream] == ["k1"]
    assert dict(stream.counts) == {"used": 1, "dropped by min_aesthetic": 1, "dropped by max_punsafe (missing)": 1,
                                   "dropped by max_punsafe": 1}


def test_one_of_several_captions_is_chosen_at_random(tmp_path):
    rng = random.Random(0)
    picks = Counter(pick_caption(["a red square", "", "a red box", None], rng) for _ in range(2000))
    assert set(picks) == {"a red square", "a red box"} and abs(picks["a red square"] - 1000) < 120
    assert pick_caption([], rng) is None and pick_caption(" ", rng) is None and pick_caption(3, rng) is None
    members = [m for i in range(8) for m in _sample(f"k{i}", caption=None,
                                                      metadata={"caption": ["a red square", "a red box"]})]
    stream = _stream(_write_tar(tmp_path / "c.tar", members))
    assert len(list(stream)) == 8 and stream.counts["used"] == 8


@pytest.mark.parametrize("persistent", [False, True])
def test_dataloader_workers_report_their_counts(tmp_path, persistent):
    """With dataloader workers the counts are made in the workers; at the end of each epoch the main process
    holds the same totals as a single process reading everything."""
    import torch

    paths = []
    for shard in range(2):
        members = [m for i in range(6) for m in _sample(f"g{shard}{i}")]
        members += _sample(f"junk{shard}", image=b"junk") + _sample(f"nocap{shard}", caption=None)
        paths.append(_write_tar(tmp_path / f"{shard:05d}.tar", members))
    pattern = str(tmp_path / "{00000..00001}.tar")
    alone = _stream(pattern)
    assert len(list(alone)) == 12
    stream = _stream(pattern)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, persistent_workers=persistent)
    for epoch in range(2):
        stream.set_epoch(epoch)
        assert sum(len(batch["key"]) for batch in loader) == 12
        counts = stream.collect_counts(num_workers=2)
        assert dict(counts) == {key: (epoch + 1) * value for key, value in alone.counts.items()}


def test_size_filters_judge_the_stored_size_not_the_reduced_decode(tmp_path):
    """A 200 x 150 JPEG trained at 32 px is decoded at a quarter scale (50 x 38); min_height 120 must still see
    150."""
    jpeg = _encode(Image.new("RGB", (200, 150), "red"), "JPEG")
    stream = _stream(_write_tar(tmp_path / "j.tar", [("k.jpg", jpeg), ("k.txt", b"a red square")]),
                     filters=FilterConfig(min_height=120))
    stream.config.resolution = 32
    assert [e["key"] for e in stream] == ["k"]
    assert decode_rgb(jpeg, min_size=32).size == (50, 38)
