"""The built-in LAION-style dataset: rendered shapes with captions, written as img2dataset-style shards.

Each sample is one filled, axis-aligned shape (circle, square or upright triangle) of random size and
position on a plain light background, with a caption naming its colour and shape, and LAION metadata.
Purple is left out by default so that a later fine-tune can teach it. About 5% of the samples carry a grey
watermark bar and `pwatermark` > 0.8. Generation is deterministic: the same arguments give the same bytes.
"""

import colorsys
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

HUES = {"red": 0, "orange": 30, "yellow": 58, "green": 120, "blue": 225, "purple": 280}
DEFAULT_COLORS = ("red", "orange", "yellow", "green", "blue")
SHAPES = ("circle", "square", "triangle")
TEMPLATES = (
    "a {color} {shape}",
    "a {color} {shape} on a white background",
    "{color} {shape}",
    "a photo of a {color} {shape}",
    "a drawing of a {color} {shape}",
    "an image of a {color} {shape}",
    "a simple {color} {shape}",
    "{shape}, {color}",
)
SAMPLES_PER_SHARD = 1000
IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges
WATERMARK_SHARE = 0.05
MARKER = "shapes.json"  # what the folder holds: version, num_samples, seed, colours
VERSION = 1  # bump when the rendering changes, so cached copies are regenerated


def caption_for(color: str, shape: str, template: str) -> str:
    text = template.format(color=color, shape=shape)
    return text.replace("a orange", "an orange")


def all_captions(colors: tuple[str, ...] = tuple(HUES)) -> list[str]:
    """Every caption the generator can write (all colours, purple included), for building a vocabulary."""
    return [caption_for(c, s, t) for c in colors for s in SHAPES for t in TEMPLATES]


def render_sample(index: int, seed: int, colors: tuple[str, ...] = DEFAULT_COLORS) -> tuple[bytes, str, dict]:
    """Render sample `index`: PNG bytes, caption and LAION-style metadata; depends only on (index, seed)."""
    rng = random.Random(seed * 1_000_003 + index)
    color, shape, template = rng.choice(colors), rng.choice(SHAPES), rng.choice(TEMPLATES)
    hue = (HUES[color] + rng.uniform(-4, 4)) % 360
    rgb = tuple(round(255 * v) for v in colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0)))
    background = tuple(rng.randint(230, 255) for _ in range(3))

    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    size = rng.uniform(0.3, 0.65) * big
    x0, y0 = rng.uniform(0.05 * big, 0.95 * big - size), rng.uniform(0.05 * big, 0.95 * big - size)
    box = (x0, y0, x0 + size, y0 + size)
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)], fill=rgb)

    watermarked = rng.random() < WATERMARK_SHARE
    if watermarked:
        bar_h = 0.12 * big
        top = rng.choice([0.02 * big, 0.86 * big])
        draw.rectangle((0.1 * big, top, 0.9 * big, top + bar_h), fill=(128, 128, 128))
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    caption = caption_for(color, shape, template)
    metadata = {
        "caption": caption,
        "width": IMAGE_SIZE,
        "height": IMAGE_SIZE,
        "original_width": IMAGE_SIZE,
        "original_height": IMAGE_SIZE,
        "similarity": round(rng.uniform(0.28, 0.4), 4),
        "pwatermark": round(rng.uniform(0.8, 1.0) if watermarked else rng.uniform(0.0, 0.3), 4),
        "punsafe": round(rng.uniform(0.0, 0.05), 4),
        "aesthetic": round(rng.uniform(4.0, 6.0), 4),
        "color": color,
        "shape": shape,
        "status": "success",
    }
    return buffer.getvalue(), caption, metadata


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(out_dir: str | os.PathLike, num_samples: int, seed: int = 0,
                 colors: tuple[str, ...] = DEFAULT_COLORS) -> list[Path]:
    """Write `num_samples` samples as `00000.tar`, `00001.tar`, ... (img2dataset naming: key = shard * 10^4 + i,
    members `<key>.png`, `<key>.txt`, `<key>.json`). The folder appears complete or not at all."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        for shard in range((num_samples + SAMPLES_PER_SHARD - 1) // SAMPLES_PER_SHARD):
            with tarfile.open(tmp / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(min(SAMPLES_PER_SHARD, num_samples - shard * SAMPLES_PER_SHARD)):
                    key = f"{shard:05d}{i:04d}"
                    png, caption, metadata = render_sample(shard * SAMPLES_PER_SHARD + i, seed, colors)
                    metadata["key"] = key
                    _add_member(tar, f"{key}.png", png)
                    _add_member(tar, f"{key}.txt", caption.encode())
                    _add_member(tar, f"{key}.json", json.dumps(metadata, sort_keys=True).encode())
        marker = {"version": VERSION, "num_samples": num_samples, "seed": seed, "colors": list(colors)}
        (tmp / MARKER).write_text(json.dumps(marker, sort_keys=True))
        if out_dir.exists() and any(out_dir.iterdir()):
            _refuse_unless_ours(out_dir)
            shutil.rmtree(out_dir)
        elif out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out_dir.glob("*.tar"))


def shard_pattern(folder: str | os.PathLike, num_samples: int) -> str:
    """The brace pattern naming every shard `write_shards` writes for `num_samples` samples; absolute, so that a
    folder named like a URL (`pipe:x`, `http:x`) is still read as a folder."""
    last = (num_samples + SAMPLES_PER_SHARD - 1) // SAMPLES_PER_SHARD - 1
    return str(Path(folder).absolute() / (f"{{00000..{last:05d}}}.tar" if last else "00000.tar"))


def default_cache_dir(num_samples: int, seed: int = 0, colors: tuple[str, ...] = DEFAULT_COLORS) -> Path:
    root = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))
    palette = "" if tuple(colors) == DEFAULT_COLORS else "-" + "-".join(colors)
    return root / f"shapes-v{VERSION}-n{num_samples}-s{seed}{palette}"


def _refuse_unless_ours(folder: Path) -> dict:
    """The marker of a folder this generator wrote; a folder with other content is never overwritten."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        raise ValueError(f"{folder} is not empty and was not written by the built-in dataset generator; "
                         "set data.path to a new or empty folder") from None


def ensure_shards(folder: str | os.PathLike | None, num_samples: int, seed: int = 0,
                  colors: tuple[str, ...] = DEFAULT_COLORS) -> str:
    """Generate the built-in set into `folder` (default: a cache folder) unless that exact set is already
    there; return the brace pattern of its shards."""
    colors = tuple(colors)
    if folder is None:  # the cache is ours: anything there that is not exactly this set is replaced
        folder = default_cache_dir(num_samples, seed, colors)
        if folder.exists() and not (folder / MARKER).exists():
            shutil.rmtree(folder)
    folder = Path(folder)
    wanted = {"version": VERSION, "num_samples": num_samples, "seed": seed, "colors": list(colors)}
    if not folder.exists() or not any(folder.iterdir()) or _refuse_unless_ours(folder) != wanted:
        write_shards(folder, num_samples, seed, colors)
    return shard_pattern(folder, num_samples)
