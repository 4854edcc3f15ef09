"""The bucketed streaming loader at SDXL's size: images/s per core and the memory its bucket buffers take.

JPEG shards of photo-like images in five aspect ratios (about 1.5 MP each, as LAION-aesthetics images above 1024 px
are) are read through `ImageTextStream` with `data.buckets` at 1024 px (17 buckets), batch 4, one process on one
thread, exactly as a DataLoader worker reads them. Reported: batches and images per second, the images that were
waiting in bucket buffers at most (counted by the stream's own `_bucket_batches`, wrapped), their bytes as uint8,
and the process's peak resident memory.

    python benchmarks/bench_buckets.py [--samples 400] [--batch 4] [--json benchmarks/results/buckets.json]
"""

import argparse
import io
import json
import resource
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
from finetune.data import ImageTextStream, WebDatasetSource  # noqa: E402
from finetune.models import build_tokenizer  # noqa: E402

SIZES = [(1536, 1024), (1024, 1536), (1280, 1280), (1824, 1024), (1024, 1824)]  # width, height


def write_shards(folder: Path, count: int, per_shard: int = 100) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for shard in range((count + per_shard - 1) // per_shard):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(min(per_shard, count - shard * per_shard)):
                width, height = SIZES[(shard * per_shard + i) % len(SIZES)]
                a, b = rng.uniform(120, 250, 3), rng.uniform(120, 250, 3)
                ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
                pixels = np.broadcast_to(a + (b - a) * ramp, (height, width, 3)).copy()
                pixels += rng.normal(0, 6, pixels.shape)
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                ImageDraw.Draw(image).ellipse((width // 4, height // 4, width // 2, height // 2), fill=(200, 40, 40))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                for suffix, data in (("jpg", buffer.getvalue()), ("txt", b"a red ball on a smooth background")):
                    info = tarfile.TarInfo(f"{shard:05d}{i:04d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{(count - 1) // per_shard:05d}}}.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp) / "shards", args.samples)
        data = DataConfig(source="webdataset", path=pattern, resolution=1024, buckets=True, shuffle_buffer=100,
                          caption_dropout=0.0)
        tokenizer = build_tokenizer(["a red ball on a smooth background"], 16)
        stream = ImageTextStream(WebDatasetSource(pattern, "caption"), data, tokenizer, seed=0,
                                 batch_size=args.batch)
        waiting, peak = [0, 0], [0, 0]  # images, bytes
        original = stream._bucket_batches

        def counted(examples):
            def feed():
                for example in examples:
                    waiting[0], waiting[1] = waiting[0] + 1, waiting[1] + example["pixel_values"].numel()
                    peak[:] = max(peak[0], waiting[0]), max(peak[1], waiting[1])
                    yield example
            for batch in original(feed()):
                waiting[0], waiting[1] = waiting[0] - len(batch["key"]), waiting[1] - batch["pixel_values"].numel()
                yield batch

        stream._bucket_batches = counted
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        batches, images, sizes = 0, 0, set()
        for batch in stream:  # (handed on and dropped, as a DataLoader does)
            batches, images = batches + 1, images + len(batch["key"])
            sizes.add(tuple(batch["pixel_values"].shape[-1:-3:-1]))
        seconds = time.perf_counter() - start
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "samples": args.samples, "batch": args.batch, "source_sizes": SIZES, "buckets_used": sorted(sizes),
        "batches": batches, "images_trained": images, "seconds": round(seconds, 2),
        "images_per_s_one_thread": round(images / seconds, 1),
        "peak_images_waiting": peak[0],
        "peak_waiting_MiB_uint8": round(peak[1] / 2**20, 1),
        "peak_rss_MiB": round(rss_after / 1024, 1),
        "rss_growth_while_reading_MiB": round((rss_after - rss_before) / 1024, 1),
        "counts": {k: v for k, v in stream.counts.items() if v},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
