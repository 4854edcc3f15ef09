"""Image and caption transforms: decode safely, make RGB, resize, crop, flip, normalise; tokenise."""

import contextlib
import io
import math
import os
import random
import threading
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class MaskMismatch(ValueError):
    """A mask whose size is not its image's."""


class ImageTooLarge(ValueError):
    """More pixels than allowed, known from the header alone (a decompression bomb, or just too big)."""


def unreadable_reason(error: Exception) -> str:
    """Why an image could not be used, for the skip counts."""
    if isinstance(error, (ImageTooLarge, Image.DecompressionBombError)):
        return "image too large"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if isinstance(error, MaskMismatch):
        return "mask size differs from its image"
    if isinstance(error, OSError) and "truncated" in str(error):
        return "truncated image"
    return "corrupt image"


class _PillowLimit:
    """Pillow refuses images over twice `Image.MAX_IMAGE_PIXELS` (and warns over it), one value for the whole process,
    read by every decode in every thread. `at_least(n)` raises it to n for a block when it is lower: while such
    blocks run (in any thread) it is the largest of their limits, and the last to end puts the value it had back,
    so a raised limit leaks to no later decode, test or source. Decodes by other code in other threads meanwhile
    see the raised limit; decode_rgb's own check from the header applies to each of ours."""

    def __init__(self):
        self.lock, self.raised, self.own = threading.Lock(), Counter(), None
        if hasattr(os, "register_at_fork"):  # (POSIX)
            os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self):
        """A forked child (a dataloader worker) has only the thread that forked, which is in no block: the blocks
        of the others never end there, so their raise is undone now rather than kept for good."""
        if self.raised:
            Image.MAX_IMAGE_PIXELS = self.own
        self.lock, self.raised = threading.Lock(), Counter()

    @contextlib.contextmanager
    def at_least(self, pixels: int):
        with self.lock:
            own = self.own if self.raised else Image.MAX_IMAGE_PIXELS  # Pillow's value, before any raise
            raise_it = own is not None and pixels > own
            if raise_it:
                self.own, self.raised[pixels] = own, self.raised[pixels] + 1
                Image.MAX_IMAGE_PIXELS = max(self.raised)
        try:
            yield
        finally:
            if raise_it:
                with self.lock:
                    self.raised -= Counter({pixels: 1})  # (drops limits no block holds any more)
                    Image.MAX_IMAGE_PIXELS = max(self.raised) if self.raised else own


PILLOW_LIMIT = _PillowLimit()


def decode_rgb(data: bytes, max_pixels: int = 89_478_485, min_size: int | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB image: EXIF rotation applied, transparency composited on white.
    Refuses images above `max_pixels` from the header, before decoding the pixels; Pillow's own limit is raised
    to `max_pixels` for the decode when it is lower. With `min_size`, a JPEG is decoded at a reduced scale
    (libjpeg's DCT scaling, Pillow's `draft`) that keeps both sides >= min_size: several times faster for a 512 px
    image trained at 32 px, and what the resize would have averaged anyway."""
    with PILLOW_LIMIT.at_least(max_pixels):
        return _decode_rgb(data, max_pixels, min_size)


def _decode_rgb(data: bytes, max_pixels: int, min_size: int | None) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > max_pixels:
        raise ImageTooLarge(f"image of {image.width}x{image.height} pixels exceeds data.max_image_pixels={max_pixels}")
    orientation, size = image.getexif().get(0x0112, 1), None
    if min_size and image.format == "JPEG":
        size = image.size[::-1] if orientation in (5, 6, 7, 8) else image.size  # upright, before the reduced decode
        image.draft("RGB", (min_size, min_size))
    if orientation != 1:  # (upright already: exif_transpose would copy it; a TIFF turns itself when loaded)
        image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    elif image.mode.startswith("I;16") or image.mode == "I":
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
    image = image.convert("RGB")
    image.info["source_size"] = size or image.size  # before any reduced-scale decoding: what size filters judge
    return image


def to_tensor(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
              rng: random.Random) -> torch.Tensor:
    """`to_uint8`, then scaled to [-1, 1]: (3, H, W) float32."""
    return to_unit_range(to_uint8(image, resolution, center_crop, random_flip, rng))


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [-1, 1], x / 127.5 - 1, wherever they are (the trainer scales on its device).
    The divisor is a scalar on the pixels' device: CUDA divides by a host scalar as a multiplication by its
    reciprocal, which is 1 ulp off for some values, while a true division gives the bits of the CPU's."""
    check_uint8(pixels)
    return pixels.float() / torch.full((), 127.5, device=pixels.device) - 1.0


def check_uint8(pixels: torch.Tensor) -> None:
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, as the data stream gives them, got {pixels.dtype}; scale float "
                        "pixels yourself, or pass the stream's pixel_values unchanged")


def to_uint8(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
             rng: random.Random) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square, maybe flip: (3, H, W) uint8. Training examples stay
    8-bit until they reach the device: a quarter of float32's bytes through the dataloader workers' shared memory,
    pinned memory and the copy to a GPU (benchmarks/README.md)."""
    return crop_square(image, resolution, center_crop, random_flip, rng)[0]


def crop_square(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                rng: random.Random) -> tuple[torch.Tensor, tuple[int, int]]:
    """`to_uint8`, and where its crop starts in the resized image, (top, left), as SDXL's micro-conditioning takes
    it: in the picture that was trained, so for a flipped crop the mirrored offset."""
    return crop_to(image, (resolution, resolution), center_crop, random_flip, rng)[:2]


def decode_mask(image_data: bytes, mask_data: bytes | None, size: tuple[int, int],
                max_pixels: int = 89_478_485) -> Image.Image | None:
    """A sample's loss mask (mode L, upright like its image): the mask file's, else the image's alpha channel, else
    None. A mask whose size is not the image's (`size`, width x height, upright) is an error; so is one larger than
    `max_pixels` (checked from its header, as for images)."""
    with PILLOW_LIMIT.at_least(max_pixels):
        return _decode_mask(image_data, mask_data, size, max_pixels)


def _decode_mask(image_data: bytes, mask_data: bytes | None, size: tuple[int, int],
                 max_pixels: int) -> Image.Image | None:
    source = Image.open(io.BytesIO(mask_data if mask_data is not None else image_data))
    if source.width * source.height > max_pixels:
        raise ImageTooLarge(f"mask of {source.width}x{source.height} pixels exceeds data.max_image_pixels")
    if mask_data is None and not (source.mode in ("RGBA", "LA", "PA") or "transparency" in source.info):
        return None
    if source.size != size and ImageOps.exif_transpose(source).size != size:
        raise MaskMismatch(f"its mask is {source.width}x{source.height} but the image {size[0]}x{size[1]}")
    upright = ImageOps.exif_transpose(source)
    return upright.convert("L") if mask_data is not None else upright.convert("RGBA").getchannel("A")


def crop_to(image: Image.Image, size: tuple[int, int], center_crop: bool, random_flip: bool,
            rng: random.Random, mask: Image.Image | None = None
            ) -> tuple[torch.Tensor, tuple[int, int], bool, torch.Tensor | None]:
    """Resize `image` to cover `size` (width, height) with its aspect ratio kept, crop that size (the centre, or at
    random), maybe flip: (3, height, width) uint8, the crop's (top, left) in the resized image (mirrored for a
    flipped crop), whether it was flipped, and `mask` (mode L, the image's size) put through the same: (1, height,
    width) uint8, or None."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if mask is not None:
        mask = mask.resize(resized, Image.Resampling.BILINEAR)
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
    if center_crop:
        left, top = (image.width - width) // 2, (image.height - height) // 2
    else:
        left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    full_width, box = image.width, (left, top, left + width, top + height)
    image, mask = image.crop(box), mask.crop(box) if mask is not None else None
    flipped = random_flip and rng.random() < 0.5
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
        left = full_width - width - left
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    mask = torch.from_numpy(np.array(mask, dtype=np.uint8))[None] if mask is not None else None
    return pixels, (top, left), flipped, mask


def bucket_sizes(resolution: int, step: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets for an area of resolution^2: for each width that is a multiple of `step`, the largest
    height (a multiple of `step`) that keeps the area within it, while the sides stay within `max_ratio` of each
    other. Sorted from the tallest to the widest; the square is among them when `resolution` is a multiple of
    `step`."""
    area, widest = resolution * resolution, {}
    for width in range(step, int(resolution * max_ratio ** 0.5) + step, step):
        height = area // width // step * step
        if height >= step and 1 / max_ratio <= width / height <= max_ratio:
            widest[height] = max(widest.get(height, 0), width)  # one bucket per height: the widest that fits
    sizes = {(w, h) for h, w in widest.items() if w >= h} | {(h, w) for h, w in widest.items() if w >= h}
    return sorted(sizes, key=lambda size: size[0] / size[1])  # the same buckets lying down as standing


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """Of the buckets that fit inside the image (`size` is width, height; images are never enlarged), the one whose
    aspect ratio is nearest the image's, on a log scale (so 1:2 and 2:1 are equally far from 1:1); among equals,
    the larger. None when the image is smaller than every bucket."""
    fitting = [b for b in buckets if b[0] <= size[0] and b[1] <= size[1]]
    ratio = math.log(size[0] / size[1])
    return min(fitting, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]), default=None)
