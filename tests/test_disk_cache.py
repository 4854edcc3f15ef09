"""`data.cache_dir`: encodings on disk, named by what was encoded and by the encoder, reused by the next run."""

import pytest
import torch

from finetune.config import ModelConfig, load_config
from finetune.disk_cache import DiskStore
from finetune.encoding import BatchEncoder
from finetune.families import text_conditioning
from finetune.models import load_components


def _batch(components, pixels):
    ids = components.tokenizer(["a red circle", "a blue square", "a red circle"][:len(pixels)], padding="max_length",
                               max_length=77, truncation=True, return_tensors="pt").input_ids
    return {"key": [f"k{i}" for i in range(len(pixels))], "pixel_values": pixels, "input_ids": ids}


def _encode(encoder, batch):
    torch.manual_seed(0)  # (a latent is drawn from the moments)
    return encoder.samples(batch, torch.device("cpu")), encoder.conditioning(batch, torch.device("cpu"))


def test_a_later_run_reads_what_an_earlier_one_wrote(tiny_sd_folder, tmp_path, monkeypatch):
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    pixels[2] = pixels[0]  # the same image twice: one entry
    batch = _batch(components, pixels)
    first = BatchEncoder(components.vae, text_conditioning(components), False, True, str(tmp_path / "cache"))
    latents, conditioning = _encode(first, batch)
    assert isinstance(first.latent_cache, DiskStore) and (len(first.latent_cache), len(first.text_cache)) == (2, 2)
    plain = BatchEncoder(components.vae, text_conditioning(components), False, False)
    torch.testing.assert_close(_encode(plain, batch)[0], latents, rtol=0, atol=0)  # the bits of encoding each time

    later = BatchEncoder(components.vae, text_conditioning(components), False, True, str(tmp_path / "cache"))
    monkeypatch.setattr(later, "_moments", lambda pixels: pytest.fail("encoded an image again"))
    monkeypatch.setattr(later, "_embed", lambda ids: pytest.fail("encoded a caption again"))
    again, conditioning_again = _encode(later, {**batch, "key": ["other", "keys", "here"]})  # keys do not matter
    torch.testing.assert_close(again, latents, rtol=0, atol=0)
    torch.testing.assert_close(conditioning_again["encoder_hidden_states"], conditioning["encoder_hidden_states"],
                               rtol=0, atol=0)


def test_another_encoder_or_transform_finds_nothing(tiny_sd_folder, tmp_path):
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    pixels = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    first = BatchEncoder(components.vae, text_conditioning(components), False, True, str(tmp_path))
    _encode(first, _batch(components, pixels))
    _encode(first, _batch(components, pixels.flip(-1)))  # flipped: other pixels, another entry
    assert len(first.latent_cache) == 2
    with torch.no_grad():
        next(components.vae.parameters()).add_(1e-3)
    changed = BatchEncoder(components.vae, text_conditioning(components), False, True, str(tmp_path))
    assert changed.latent_cache.folder != first.latent_cache.folder and len(changed.latent_cache) == 0
    assert changed.text_cache.folder == first.text_cache.folder  # the text encoder did not change


def test_the_disk_cache_settings():
    config = load_config(None, ["data.source=hf", "data.path=someone/set", "data.streaming=true", "data.cache=true",
                                "data.cache_dir=/tmp/x"])
    assert config.data.cache_dir == "/tmp/x"  # streamed data caches by pixels, not keys
    with pytest.raises(ValueError, match="data.cache_dir: set data.cache: true"):
        load_config(None, ["data.cache_dir=/tmp/x"])
