"""Several datasets in one run: what each gives an epoch, planned against seen, and what the mix costs.

A 3-dataset config as a DreamBooth-style run writes it: 12 instance images with repeats 5 and a prefix, a
regularisation folder of 40 images cycled to 60 samples an epoch at loss weight 0.5, and a LAION-like stream of
webdataset shards (resampled, num_samples 90). Its stream is read for 2 epochs by 2 processes x 2 DataLoader
workers (4 readers, as `ImageTextStream` reads in each), and the samples each dataset gave are counted per epoch:
they must equal the start-up summary's plan exactly. Also reported: the readers' overlap within a pass of the
repeated dataset (each image must come `repeats` times an epoch over all readers, never more), and the stream's
examples per second with the mix against the same data as one folder (one thread; sources built once, outside
the timing).

    python benchmarks/bench_mixing.py [--json benchmarks/results/mixing.json]
"""

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.config import load_config  # noqa: E402
from finetune.data import ImageTextStream, build_source  # noqa: E402
from finetune.models import build_tokenizer  # noqa: E402


def write_folder(folder: Path, count: int, shade: int, captions: bool = True) -> str:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((48, 64, 3), (shade + 5 * i) % 256, np.uint8)).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(f"a photo of thing {i}")
    return str(folder)


def write_shards(folder: Path, count: int, per_shard: int = 10) -> str:
    folder.mkdir(parents=True)
    for shard in range(count // per_shard):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                png = io.BytesIO()
                Image.fromarray(np.full((48, 64, 3), i * 20, np.uint8)).save(png, format="PNG")
                for ext, payload in (("png", png.getvalue()), ("txt", f"a stream photo {i}".encode())):
                    info = tarfile.TarInfo(f"{shard:05d}{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / f"{{00000..{count // per_shard - 1:05d}}}.tar")


TOKENIZER = build_tokenizer(["a photo of thing stream sks 0 1 2 3 4 5 6 7 8 9"], 20)


def read(config, readers: int, epoch: int, source=None) -> list[str]:
    """The keys of one epoch's examples, reader after reader (`source`: built once by the caller, to time the
    stream alone)."""
    keys = []
    for part in range(readers):
        stream = ImageTextStream(source or build_source(config.data, 0), config.data, [TOKENIZER], seed=0,
                                 rank=part, world_size=readers)
        stream.set_epoch(epoch)
        keys += [example["key"] for example in stream]
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        instance, reg = write_folder(tmp / "sks", 12, 0), write_folder(tmp / "class", 40, 100, captions=False)
        shards = write_shards(tmp / "laion", 80)
        sources = (f"[{{source: imagefolder, path: {instance}, repeats: 5, caption_prefix: sks, name: instance}}, "
                   f"{{source: imagefolder, path: {reg}, samples_per_epoch: 60, default_caption: a photo, "
                   f"is_regularisation: true, loss_weight: 0.5, name: class}}, "
                   f"{{source: webdataset, path: '{shards}', resampled: true, num_samples: 90, name: laion}}]")
        config = load_config(None, [f"data.sources={sources}", "data.resolution=32", "data.shuffle_buffer=50"])
        source = build_source(config.data, 0)
        names = [entry.name for entry in source.entries]
        planned = dict(zip(names, source.planned()))
        epochs = []
        for epoch in (0, 1):
            keys = read(config, 4, epoch)
            seen = Counter(key.split("/")[0] for key in keys)
            per_image = Counter(key for key in keys if key.startswith("instance/"))
            epochs.append({"epoch": epoch, "seen": dict(seen), "equal_to_plan": dict(seen) == planned,
                           "instance_images_times_each": sorted(set(per_image.values()))})

        # The mix's cost: one reader, the instance folder through the mix vs. read alone as one source.
        alone = load_config(None, ["data.source=imagefolder", f"data.path={instance}", "data.resolution=32",
                                   "data.shuffle_buffer=50"])
        mixed = load_config(None, [f"data.sources=[{{source: imagefolder, path: {instance}, repeats: 1}}]",
                                   "data.resolution=32", "data.shuffle_buffer=50"])
        rates = {}
        for name, cfg in (("one source", alone), ("through the mix", mixed)):
            best, built = 0.0, build_source(cfg.data, 0)
            for _ in range(5):
                start = time.perf_counter()
                count = sum(len(read(cfg, 1, epoch, built)) for epoch in range(20))
                best = max(best, count / (time.perf_counter() - start))
            rates[name] = round(best, 1)
    result = {"machine": "2-core x86_64 CPU, one thread", "datasets": planned, "epochs": epochs,
              "examples_per_s": rates}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
