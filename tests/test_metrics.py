"""Metric maths: FID against hand-computed Gaussians and scipy's sqrtm, the CLIP score's cosine, the fixed timesteps
and noise of the validation loss, and feature models read from a local folder (tiny ones built from configs)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import metrics
from tests.conftest import clip_tokenizer


def save_tiny_clip(folder: Path) -> Path:
    """A tiny random CLIPModel (text and vision), its character-level CLIPTokenizer and a 32 px image processor,
    saved as a transformers folder in safetensors: what --clip-model takes."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / (folder.name + "-vocab"))
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


# ---- FID ---------------------------------------------------------------------------------------


def test_fid_of_one_dimensional_gaussians():
    # N(1, 4) vs N(3, 1): (1 - 3)^2 + 4 + 1 - 2 sqrt(4 * 1) = 5
    assert metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == \
        pytest.approx(5.0, abs=1e-12)


def test_fid_of_diagonal_gaussians_by_hand():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, -1.0, 2.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])  # one variance 0: a singular covariance
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-10)


def test_fid_matches_the_scipy_sqrtm_formula():
    """On full, well-conditioned covariances the eigen formula gives what pytorch-fid's sqrtm formula gives, with
    pytorch-fid's own fit (np.mean, np.cov): the whole FID, the Gaussian fit included, against an independent one.
    scipy is in the test extra, so this runs (and fails without it) rather than being skipped."""
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.3
    mu1, sigma1 = np.mean(a, axis=0), np.cov(a, rowvar=False)
    mu2, sigma2 = np.mean(b, axis=0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    assert metrics.fid(a, b) == pytest.approx(reference, rel=1e-8)


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(10, 32))  # fewer samples than dimensions: both covariances singular
    assert metrics.fid(features, features) == pytest.approx(0.0, abs=1e-9)
    distances = [metrics.fid(features, features + shift) for shift in (0.1, 0.5, 1.0)]
    # a shift moves the mean only: the distance is |shift|^2 per dimension
    assert distances == pytest.approx([0.01 * 32, 0.25 * 32, 32.0], rel=1e-6)
    wider = metrics.fid(features, features * 2)
    assert np.isfinite(wider) and wider > 0


def test_gaussian_fit_is_the_unbiased_mean_and_covariance():
    features = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    mu, sigma = metrics.gaussian_fit(features)
    assert mu == pytest.approx([3.0, 2.0])
    assert sigma == pytest.approx(np.array([[4.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.gaussian_fit(features[:1])


def test_fid_refuses_mismatched_gaussians():
    with pytest.raises(ValueError, match="mismatched"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---- CLIP score --------------------------------------------------------------------------------


def test_clip_scores_are_100_times_the_clamped_cosine():
    image = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    # cosines by hand: 1, 1/sqrt(2), -1 (clamped to 0), -1 (clamped to 0)
    expected = [100.0, 100 / 2 ** 0.5, 0.0, 0.0]
    assert metrics.clip_scores(image, text).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        metrics.clip_scores(image, text[:2])


# ---- validation loss settings ------------------------------------------------------------------


def test_loss_timesteps_are_evenly_spaced_bin_centres():
    assert metrics.loss_timesteps(1000, 10) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert metrics.loss_timesteps(1000, 1) == [500]
    assert metrics.loss_timesteps(7, 7) == list(range(7))
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        metrics.loss_timesteps(1000, 0)


def test_fixed_noise_depends_on_seed_and_index_only():
    a = metrics.fixed_noise((3, 4, 4), seed=0, index=5)
    torch.randn(100)  # the global RNG plays no part
    assert torch.equal(a, metrics.fixed_noise((3, 4, 4), seed=0, index=5))
    assert not torch.equal(a, metrics.fixed_noise((3, 4, 4), seed=0, index=6))
    assert not torch.equal(a, metrics.fixed_noise((3, 4, 4), seed=1, index=5))


# ---- feature models ----------------------------------------------------------------------------


def _images(count=4, size=24):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(count)]


def test_clip_feature_model_from_a_local_folder(tiny_clip):
    model = metrics.load_feature_model(str(tiny_clip), "--clip-model", needs_text=True)
    assert model.is_clip
    images, captions = _images(), ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    image_embeds, text_embeds = model.image_features(images, batch_size=3), model.text_features(captions, batch_size=3)
    assert image_embeds.shape == text_embeds.shape == (4, 8)
    assert torch.equal(image_embeds, model.image_features(images, batch_size=3))  # deterministic
    assert torch.allclose(image_embeds, model.image_features(images, batch_size=4), atol=1e-6)  # batching: rounding
    expected = model.model.get_image_features(
        pixel_values=model.image_processor(images=images, return_tensors="pt")["pixel_values"]).pooler_output
    assert torch.allclose(image_embeds, expected, atol=1e-6)  # the projected image embeddings
    scores = metrics.clip_scores(image_embeds, text_embeds)
    assert torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 100)).all()
    # The random weights make no promise that matching captions score higher; the score does read the caption.
    assert not torch.equal(scores, metrics.clip_scores(image_embeds, text_embeds.roll(1, dims=0)))


def test_a_vision_only_model_gives_fid_features_but_no_clip_score(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model = metrics.load_feature_model(str(tmp_path), "--fid-model", needs_text=False)
    features = model.image_features(_images()).numpy()
    assert features.shape == (4, 16) and metrics.fid(features, features) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="no text side"):
        metrics.load_feature_model(str(tmp_path), "--clip-model", needs_text=True)


def test_a_missing_or_pickled_feature_model_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)--clip-model .*nowhere.*hf download .*model.safetensors"):
        metrics.load_feature_model(str(tmp_path / "nowhere"), "--clip-model", needs_text=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"(?s)--fid-model .*no \*.safetensors.*never loaded"):
        metrics.load_feature_model(str(tmp_path), "--fid-model", needs_text=False)
