"""Write scikit-learn's 1,797 handwritten-digit scans as LAION-style webdataset shards (issue 21).

Each 8x8 scan (values 0..16) is upscaled to 32 px (nearest, 4x4 blocks), rendered dark digit on a light
background as an RGB PNG, and captioned from one of four templates that name the digit as a word or as a
numeral. A fixed, stratified 20% of the scans is held out (not written to the training shards) for the
classifier's test (benchmarks/conditioning/classify.py).

    python benchmarks/conditioning/make_digits.py /tmp/cond/digits [--templates default|word1]

writes OUT/00000.tar, OUT/00001.tar (img2dataset naming, `<key>.png/.txt/.json`) and OUT/split.json
(train / test indices into load_digits()). `--templates word1` captions every image "a handwritten digit <word>"
(the class always named the same way), for the template experiment.
"""

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = {
    "default": ("a handwritten digit {word}", "the number {num} written by hand", "a scan of the digit {num}",
                "handwritten {word}"),
    "word1": ("a handwritten digit {word}",),
}
SAMPLES_PER_SHARD = 1000
SIZE = 32
TEST_SHARE = 0.2


def render(scan: np.ndarray, size: int = SIZE) -> Image.Image:
    """An 8x8 scan (0..16, ink high) as a size-px RGB image, dark ink (0) on light paper (255)."""
    gray = (255 - np.asarray(scan, dtype=np.float64) * 255 / 16).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").resize((size, size), Image.Resampling.NEAREST).convert("RGB")


def split(labels: np.ndarray, seed: int = 0) -> tuple[list[int], list[int]]:
    """A stratified train/test split of the scans' indices (TEST_SHARE of each class held out)."""
    rng = random.Random(seed)
    train, test = [], []
    for digit in range(10):
        idx = [i for i in range(len(labels)) if labels[i] == digit]
        rng.shuffle(idx)
        k = round(TEST_SHARE * len(idx))
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write(out: Path, templates: str = "default", seed: int = 0) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, test = split(digits.target, seed)
    rng = random.Random(seed)
    order = list(train)
    rng.shuffle(order)  # shards mixed by class
    out.mkdir(parents=True, exist_ok=True)
    for shard in range((len(order) + SAMPLES_PER_SHARD - 1) // SAMPLES_PER_SHARD):
        with tarfile.open(out / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, index in enumerate(order[shard * SAMPLES_PER_SHARD:(shard + 1) * SAMPLES_PER_SHARD]):
                key = f"{shard:05d}{i:04d}"
                label = int(digits.target[index])
                caption = rng.choice(TEMPLATES[templates]).format(word=WORDS[label], num=label)
                buffer = io.BytesIO()
                render(digits.images[index]).save(buffer, format="PNG")
                meta = {"caption": caption, "key": key, "width": SIZE, "height": SIZE, "label": label,
                        "index": int(index), "status": "success"}
                _add(tar, f"{key}.png", buffer.getvalue())
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    info = {"train": train, "test": test, "templates": list(TEMPLATES[templates]), "seed": seed,
            "num_train": len(train), "num_test": len(test)}
    (out / "split.json").write_text(json.dumps(info))
    last = (len(order) - 1) // SAMPLES_PER_SHARD
    pattern = str(out.absolute() / (f"{{00000..{last:05d}}}.tar" if last else "00000.tar"))
    print(f"wrote {len(train)} training samples ({templates} templates) to {pattern}; {len(test)} scans held out")
    return info


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--templates", choices=sorted(TEMPLATES), default="default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.out, args.templates, args.seed)
