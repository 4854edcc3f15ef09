"""From a batch of the data stream to the UNet's inputs: the training samples x_0 and the text conditioning (the
model family's, `families.py`).

x_0 is the image itself (pixel-space models) or its VAE latent scaled by `vae.config.scaling_factor`
(latent-space models). With `data.cache`, the frozen encoders' outputs are kept in memory: the VAE's latent
distribution per sample key and orientation (a latent is still drawn from it at every step, as without the cache)
and the text embeddings per token sequence (so caption dropout still works; for SDXL both encoders' outputs). The
first sight of a sample encodes it; every later one reuses the stored result. Stored results are kept on the CPU (a
LAION-scale cache does not fit a GPU) and reach a GPU through pinned memory, without a host sync. The batch's pixels
come as uint8 and are scaled to [-1, 1] on the device.
"""

import zlib
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .data.transforms import check_uint8, to_unit_range
from .disk_cache import DiskStore, fingerprint, pixel_keys
from .families import OneEncoder, TwoEncodersXL


class BatchEncoder:
    def __init__(self, vae, text: OneEncoder | TwoEncodersXL, text_trains: bool, cache: bool,
                 cache_dir: str | None = None):
        """With `cache_dir` (and `cache`), the caches are `DiskStore`s in folders named by the encoders' weights,
        keyed by what was encoded: pixels (so no sample key is needed) or token ids."""
        self.vae, self.text_family, self.text_trains, self.cache = vae, text, text_trains, cache
        self.on_disk = bool(cache and cache_dir)
        self.latent_cache: dict | DiskStore = {}
        self.fingerprints: dict[str, tuple[tuple[int, ...], int]] = {}
        self.text_cache: dict | DiskStore = {}
        self.prior = None  # prior.mode base_prediction: its `prior.BasePrediction`, which the loss goes through
        if self.on_disk:
            if vae is not None:
                self.latent_cache = DiskStore(Path(cache_dir) / f"vae-{fingerprint(vae, 'latent_dist.parameters')}")
            if not text_trains:
                how = (type(text).__name__, text.zeros_for_empty)
                self.text_cache = DiskStore(Path(cache_dir) / f"text-{fingerprint(*text.encoders, how)}")

    def samples(self, batch: dict, device: torch.device) -> torch.Tensor:
        """x_0 in float32: pixels in [-1, 1], or z ~ q(z | x) times the VAE's scaling factor."""
        pixels = batch["pixel_values"]
        check_uint8(pixels)  # (here too: with every key cached they are never scaled)
        if self.vae is None:
            return to_unit_range(_to(pixels, device))
        if self.on_disk:
            moments = self._cached(self.latent_cache, pixel_keys(pixels), pixels, self._moments)[0]
        elif self.cache:
            keys = cache_keys(batch)
            self._check_keys(keys, pixels)
            moments = self._cached(self.latent_cache, keys, pixels, self._moments)[0]
        else:
            moments = self._moments(pixels)
        latents = DiagonalGaussianDistribution(_to(moments, device)).sample()
        return latents.float() * self.vae.config.scaling_factor

    def conditioning(self, batch: dict, device: torch.device) -> dict:
        """The UNet's keyword arguments for the batch's captions (with gradients when the text encoders train)."""
        family, ids = self.text_family, self.text_family.ids(batch)
        if self.text_trains:
            embeds = family.embed(ids, device)
        elif self.cache:
            rows = self._cached(self.text_cache, [tuple(row.tolist()) for row in ids], ids, self._embed)
            embeds = tuple(_to(part, device) for part in rows)
        else:
            embeds = self._embed(ids)
        return family.unet_kwargs(embeds, batch, device)

    def _check_keys(self, keys: list[str], pixels: torch.Tensor) -> None:
        """The latent cache is keyed by sample key: a key that comes back with other pixels would train on the
        wrong image, so it is an error. Each key keeps its image's size and a CRC-32 of every byte of it: any
        changed pixel shows. (0.9 ms for a batch of 8 at 512 px on this project's CPU, against about 20 ms to
        decode them; double-precision sums of every value took an H200 run's host about 70 ms a step.)"""
        for key, image in zip(keys, pixels.cpu()):
            fingerprint = (tuple(image.shape), zlib.crc32(image.contiguous().numpy()))
            if self.fingerprints.setdefault(key, fingerprint) != fingerprint:
                raise ValueError(f"sample key {key!r} names two different images, but data.cache keeps one encoding "
                                 "per key: the data's keys must be unique and the same every epoch. Make them so, "
                                 "or set data.cache: false")

    @torch.no_grad()
    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        device = self.vae.device
        return self.vae.encode(to_unit_range(_to(pixels, device)).to(self.vae.dtype), return_dict=False)[0].parameters

    @torch.no_grad()
    def _embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        device = self.text_family.text_encoder.device
        return self.text_family.embed(_to(ids, device), device)

    @staticmethod
    def _cached(cache: dict, keys: list, inputs: torch.Tensor, encode):
        """Rows for `keys` as a tuple of stacked tensors, encoding (in one batch) and storing on the CPU the rows not
        seen before. `encode` returns a tensor, or a tuple of them."""
        # In batch order (the encoders' roundings depend on a row's place in the batch), each key's first row.
        missing = sorted({key: i for i, key in reversed(list(enumerate(keys))) if key not in cache}.values())
        if missing:
            encoded = encode(inputs[missing])
            parts = encoded if isinstance(encoded, tuple) else (encoded,)
            for j, i in enumerate(missing):
                cache[keys[i]] = tuple(part[j].cpu() for part in parts)
        rows = [cache[key] for key in keys]  # (each read once: from a DiskStore, a file)
        return tuple(torch.stack([row[n] for row in rows]) for n in range(len(rows[0])))


def cache_keys(batch: dict) -> list[str]:
    """The latent cache's key of each sample: its key, and for a flipped one the key with " (flipped)": each
    orientation is encoded once (the VAE's latent of a flipped image is not the flipped latent)."""
    flipped = batch.get("flipped", [False] * len(batch["key"]))
    return [f"{key} (flipped)" if bool(flip) else key for key, flip in zip(batch["key"], flipped)]


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from the host to a GPU through pinned memory with a non-blocking copy (a copy from
    pageable memory waits for every kernel queued before it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
