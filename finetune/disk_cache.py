"""`data.cache_dir`: the frozen encoders' outputs kept on disk instead of in memory, and reused by the next run.

A `DiskStore` is a mapping, as the in-memory cache is a dict: key -> tuple of CPU tensors. Each entry is one
safetensors file named by the SHA-256 of what was encoded (the uint8 pixels of the transformed image, or the token
ids), under a folder named by the encoder: a hash of its weights (their bytes, dtypes and shapes) and of how its
output is taken. The same image, transform and encoder find the same file in any later run, in any process; a
changed encoder or transform finds none. Every process writes its own samples' files (written beside, then renamed
into place: a file is whole or absent) and never waits on another, so no collective can time out; two processes
that meet the same image write the same encoding, up to the rounding of its place in a batch, and the last rename
wins. Memory holds nothing but what a batch needs.
"""

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def fingerprint(*parts) -> str:
    """A short hash of models' weights (bytes, dtype, shape of every tensor, in order) and of plain values."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.nn.Module):
            for name, tensor in part.state_dict().items():
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


class DiskStore:
    """key -> tuple of tensors, one safetensors file per key under `folder`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key) -> Path:
        name = hashlib.sha256(key if isinstance(key, bytes) else repr(key).encode()).hexdigest()
        return self.folder / name[:2] / f"{name}.safetensors"

    def __contains__(self, key) -> bool:
        return self.path(key).is_file()

    def __getitem__(self, key) -> tuple[torch.Tensor, ...]:
        tensors = load_file(self.path(key))
        return tuple(tensors[str(i)] for i in range(len(tensors)))

    def __setitem__(self, key, value: tuple[torch.Tensor, ...]) -> None:
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        save_file({str(i): tensor.contiguous() for i, tensor in enumerate(value)}, tmp)
        os.replace(tmp, path)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.safetensors"))


def pixel_keys(pixels: torch.Tensor) -> list[bytes]:
    """What names an encoded image on disk: its transformed uint8 pixels themselves (shape included), so the same
    image under the same crop, flip and size is one entry, whatever its sample key."""
    return [f"{tuple(image.shape)}".encode() + image.contiguous().numpy().tobytes() for image in pixels.cpu()]
