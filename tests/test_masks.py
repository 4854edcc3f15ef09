"""Masked loss: per-pixel weights from a mask file or the image's alpha channel, transformed with the image."""

import io
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from finetune.config import DataConfig, load_config
from finetune.data import ImageTextStream, build_source
from finetune.data.transforms import crop_to
from finetune.models import build_tokenizer
from finetune.objective import diffusion_loss, mask_weights

from .test_train import _train


def _pred_target(shape=(2, 4, 8, 8)):
    torch.manual_seed(0)
    return torch.randn(shape, requires_grad=True), torch.randn(shape)


def test_an_all_ones_mask_is_the_unmasked_loss():
    pred, target = _pred_target()
    ones = torch.full((2, 1, 16, 16), 255, dtype=torch.uint8)  # image-sized: averaged down to the latent's 8 x 8
    for unmasked, normalize in ((0.0, True), (0.0, False), (0.3, True)):
        weights = mask_weights(ones, pred, unmasked, normalize)
        assert torch.equal(diffusion_loss(pred, target, None, weights), diffusion_loss(pred, target))
        snr = torch.tensor([0.5, 2.0])
        torch.testing.assert_close(diffusion_loss(pred, target, snr, weights), diffusion_loss(pred, target, snr),
                                   rtol=1e-6, atol=0)


def test_masked_out_pixels_get_no_gradient_and_the_scale_is_kept():
    pred, target = _pred_target()
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    mask[..., 4:] = 255  # the right half
    diffusion_loss(pred, target, None, mask_weights(mask, pred, 0.0, True)).backward()
    assert torch.count_nonzero(pred.grad[..., :4]) == 0
    assert torch.count_nonzero(pred.grad[..., 4:]) == pred[..., 4:].numel()
    # A uniform error: with the area normalised, half a mask gives the full mask's loss; without, half of it.
    flat_pred, flat_target = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    full = diffusion_loss(flat_pred, flat_target)
    assert diffusion_loss(flat_pred, flat_target, None, mask_weights(mask, flat_pred, 0.0, True)) == full
    assert diffusion_loss(flat_pred, flat_target, None, mask_weights(mask, flat_pred, 0.0, False)) == full / 2


def test_the_mask_is_cropped_and_flipped_with_its_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    mask = Image.fromarray(np.tile(np.arange(30, dtype=np.uint8) * 8, (20, 1)))  # brighter to the right
    flips = set()
    for seed in range(8):
        pixels, _, flipped, cropped = crop_to(image, (16, 16), False, True, random.Random(seed), mask)
        again, *_ = crop_to(image, (16, 16), False, True, random.Random(seed))
        assert torch.equal(pixels, again) and cropped.shape == (1, 16, 16)  # the mask changes nothing else
        row = cropped[0, 0].int()
        assert bool((row[1:] <= row[:-1]).all() if flipped else (row[1:] >= row[:-1]).all())
        flips.add(flipped)
    assert flips == {True, False}


def test_the_mask_stays_aligned_with_its_image_pixel_for_pixel():
    """A mask that is a copy of the image's red channel comes out equal to the red channel of the training crop,
    random crops and flips included (30 x 20 to 16 x 20: a crop with no resize, so equality is exact)."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for seed in range(8):
        pixels, _, _, mask = crop_to(image, (16, 20), False, True, random.Random(seed), image.getchannel("R"))
        assert torch.equal(mask[0], pixels[0]), seed


def test_a_mask_file_follows_a_jpeg_decoded_at_a_reduced_scale(tmp_path):
    """A 128 px JPEG read for 16 px training is decoded at a reduced scale (draft); its full-size mask is resized
    to match before the crop: the mask's left half is where the image's red half is."""
    half = np.zeros((128, 128, 3), dtype=np.uint8)
    half[:, :64, 0] = 255
    buffer = io.BytesIO()
    Image.fromarray(half).save(buffer, format="JPEG", quality=95)
    mask = Image.fromarray((half[:, :, 0] > 127).astype(np.uint8) * 255)
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        sink.write({"__key__": "a", "jpg": buffer.getvalue(), "mask.png": _png(mask), "txt": "a red square"})
    data = DataConfig(source="webdataset", path=str(tmp_path / "00000.tar"), resolution=16, masks=True,
                      caption_dropout=0.0)
    example = next(iter(ImageTextStream(build_source(data, 0), data, build_tokenizer(["a red square"], 8), seed=0)))
    red, weights = example["pixel_values"][0].int(), example["mask"][0].int()
    assert (red - weights).abs().max() <= 40 and weights[:, :7].min() == 255 and weights[:, 9:].max() == 0


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_masks_come_from_a_mask_file_or_the_alpha_channel(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    rgba.paste((255, 0, 0, 0), (0, 0, 8, 16))  # left half transparent
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 16, 8))  # top half
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        sink.write({"__key__": "alpha", "png": _png(rgba), "txt": "a red square"})
        sink.write({"__key__": "file", "png": _png(Image.new("RGB", (16, 16), "blue")), "mask.png": _png(mask),
                    "txt": "a blue square"})
        sink.write({"__key__": "none", "png": _png(Image.new("RGB", (16, 16), "red")), "txt": "a red square"})
        sink.write({"__key__": "wrong", "png": _png(Image.new("RGB", (16, 16), "red")),
                    "mask.png": _png(Image.new("L", (8, 8), 255)), "txt": "a red square"})
    data = DataConfig(source="webdataset", path=str(tmp_path / "00000.tar"), resolution=16, masks=True,
                      caption_dropout=0.0, max_bad_fraction=0.5)
    stream = ImageTextStream(build_source(data, 0), data, build_tokenizer(["a red blue square"], 8), seed=0)
    masks = {example["key"]: example["mask"][0] for example in stream}
    assert sorted(masks) == ["alpha", "file", "none"]
    assert masks["alpha"][:, :8].max() == 0 and masks["alpha"][:, 8:].min() == 255
    assert masks["file"][:8].min() == 255 and masks["file"][8:].max() == 0
    assert masks["none"].min() == 255  # no mask: trains everywhere
    assert stream.counts["skipped: mask size differs from its image"] == 1


@pytest.mark.slow
def test_a_masked_run_trains(tmp_path):
    out = tmp_path / "run"
    _train(tmp_path, "data.masks=true", "train.unmasked_weight=0.1", "train.max_train_steps=2",
           f"train.output_dir={out}")
    assert (out / "model_index.json").is_file()
    with pytest.raises(ValueError, match="train.unmasked_weight: got 2.0; must be in"):
        load_config(None, ["train.unmasked_weight=2"])
