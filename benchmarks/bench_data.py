"""Data loader throughput per worker: read shards, decode, resize, crop, tokenise, one process on one thread.

Two kinds of shards are written to a temporary folder first: the built-in set (32 px PNG) and 512 px JPEGs
(smooth backgrounds with a shape and some grain, like photos more than like noise). Each is read through
`ImageTextStream` exactly as a dataloader worker reads it, at the training resolutions given, and the rate is
set against what the default trainer consumes (samples/s from benchmarks/bench_step.py, measured on this
machine: 67).

    python benchmarks/bench_data.py [--samples 600] [--trainer-samples-per-s 67]
"""

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.config import DataConfig  # noqa: E402
from finetune.data import ImageTextStream, WebDatasetSource, shapes  # noqa: E402
from finetune.models import build_tokenizer  # noqa: E402


def write_jpeg_shards(folder: Path, count: int, size: int = 512, per_shard: int = 100) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for shard in range((count + per_shard - 1) // per_shard):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(min(per_shard, count - shard * per_shard)):
                a, b = rng.uniform(120, 250, 3), rng.uniform(120, 250, 3)
                pixels = a + (b - a) * ramp[None, :, None] * ramp[:, None, None]
                pixels += rng.normal(0, 6, (size, size, 3))
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                x, y, r = rng.integers(100, size - 100, 2).tolist() + [int(rng.integers(30, 90))]
                fill = tuple(rng.integers(0, 255, 3).tolist())
                ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=fill)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                key = f"{shard:05d}{i:04d}"
                for name, payload in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", b"a red circle"),
                                      (f"{key}.json", json.dumps({"width": size, "height": size}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / f"{{00000..{(count - 1) // per_shard:05d}}}.tar")


def images_per_second(pattern: str, resolution: int, tokenizer, repeats: int = 2) -> float:
    config = DataConfig(source="webdataset", path=pattern, resolution=resolution, shuffle_buffer=100)
    stream = ImageTextStream(WebDatasetSource(pattern, "caption"), config, tokenizer, seed=0)
    best = 0.0
    for epoch in range(repeats):  # the first pass also warms the page cache
        stream.set_epoch(epoch)
        start, count = time.perf_counter(), sum(1 for _ in stream)
        best = max(best, count / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--trainer-samples-per-s", type=float, default=67.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(shapes.all_captions(), 16)
    with tempfile.TemporaryDirectory() as tmp:
        png = str(Path(tmp) / "png")
        shapes.write_shards(png, args.samples)
        png_pattern = shapes.shard_pattern(png, args.samples)
        jpeg_pattern = write_jpeg_shards(Path(tmp) / "jpeg", args.samples)
        rows = [("32 px PNG (built-in set)", png_pattern, 32), ("512 px JPEG", jpeg_pattern, 512),
                ("512 px JPEG", jpeg_pattern, 256), ("512 px JPEG", jpeg_pattern, 32)]
        print("| shards | trained at | images/s per worker | x default trainer |")
        print("|---|---|---|---|")
        for name, pattern, resolution in rows:
            rate = images_per_second(pattern, resolution, tokenizer)
            print(f"| {name} | {resolution} px | {rate:.0f} | {rate / args.trainer_samples_per_s:.1f} |")


if __name__ == "__main__":
    main()
