"""The maths behind the evaluate command's metrics, each piece testable alone.

- Validation loss: the diffusion objective (`finetune/objective.py`, the model's own prediction type, no
  min-SNR weights) at a fixed set of timesteps with fixed noise, so two checkpoints get comparable numbers.
- FID: the Frechet distance between Gaussian fits of two sets of image features (Heusel et al. 2017,
  https://arxiv.org/abs/1706.08500), d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).
- CLIP score: 100 * max(cos(image embedding, text embedding), 0), averaged over images (Hessel et al. 2021,
  https://arxiv.org/abs/2104.08718, with torchmetrics' scale of 100 instead of 2.5).

The feature models (a transformers CLIP or other vision model) come from a local folder the user supplies;
nothing is downloaded, and only safetensors weights are read.
"""

from pathlib import Path

import numpy as np
import torch

from .objective import diffusion_loss, training_target

CLIP_DOWNLOAD_HINT = (
    "a local folder holding a transformers CLIPModel in safetensors (config.json, model.safetensors) with its "
    "tokenizer and preprocessor_config.json. This command never downloads; get one once with e.g.\n"
    "    hf download openai/clip-vit-large-patch14 --local-dir models/clip-vit-large-patch14 "
    '--include "*.json" "*.txt" "model.safetensors"\n'
    "and pass --clip-model models/clip-vit-large-patch14")


# ---- validation loss ---------------------------------------------------------------------------


def loss_timesteps(num_train_timesteps: int, count: int = 10) -> list[int]:
    """`count` timesteps evenly spaced over [0, T): the middle of each of `count` equal bins (T = 1000, count = 10:
    50, 150, ..., 950); count = T gives every timestep."""
    if not 1 <= count <= num_train_timesteps:
        raise ValueError(f"the number of loss timesteps must be in [1, {num_train_timesteps}] (T); got {count}")
    return [(2 * k + 1) * num_train_timesteps // (2 * count) for k in range(count)]


def fixed_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """eps ~ N(0, I) of `shape` for sample number `index`: a function of (seed, index) alone, so the noise a
    sample gets does not depend on the batch size or on which samples share its batch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=generator)


@torch.no_grad()
def timestep_losses(unet, scheduler, samples: torch.Tensor, conditioning: dict, noise: torch.Tensor,
                    timesteps: list[int]) -> torch.Tensor:
    """The objective's loss of `unet` on one batch at each of `timesteps` (the same noise at every timestep):
    x_t = scheduler.add_noise(x_0, eps, t), target by the scheduler's prediction type, mean squared error.
    `conditioning`: the UNet's keyword arguments besides x_t and t (`encoder_hidden_states`, for SDXL also
    `added_cond_kwargs`), cast to its dtype. Returns float64 losses shaped (len(timesteps),), each the batch mean."""
    conditioning = _cast(conditioning, unet.dtype)
    losses = []
    for t in timesteps:
        steps = torch.full((samples.shape[0],), t, dtype=torch.long, device=samples.device)
        noisy = scheduler.add_noise(samples, noise, steps)
        model_pred = unet(noisy.to(unet.dtype), steps, **conditioning, return_dict=False)[0]
        losses.append(diffusion_loss(model_pred, training_target(scheduler, samples, noise, steps)).double())
    return torch.stack(losses).cpu()


def _cast(kwargs: dict, dtype: torch.dtype) -> dict:
    return {k: _cast(v, dtype) if isinstance(v, dict) else v.to(dtype) for k, v in kwargs.items()}


# ---- FID ---------------------------------------------------------------------------------------


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features (N, D) in float64, as the FID implementations fit them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"a Gaussian fit needs features shaped (N >= 2, D); got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _psd_eigenvalues_sqrt(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square roots of the eigenvalues of a symmetric positive semi-definite matrix, and its eigenvectors. Eigenvalues
    within rounding of zero (below n * eps * the largest) count as 0: their square roots would turn rounding noise of
    1e-16 into errors of 1e-8 each, which add up over the many zero eigenvalues of a covariance of few samples."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    floor = max(eigenvalues.max(initial=0.0), 0.0) * len(matrix) * np.finfo(np.float64).eps
    return np.sqrt(np.where(eigenvalues > floor, eigenvalues, 0.0)), eigenvectors


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2)) between N(mu_1, S_1) and N(mu_2, S_2).

    tr((S_1 S_2)^(1/2)) is computed as tr((S_1^(1/2) S_2 S_1^(1/2))^(1/2)), whose matrix is symmetric with the same
    eigenvalues as S_1 S_2: a symmetric eigendecomposition gives real, non-negative roots, so the imaginary parts
    and the failures on singular covariances (fewer samples than feature dimensions) that pytorch-fid's
    `scipy.linalg.sqrtm` has to patch (an eps * I offset, dropping a small imaginary part) cannot arise."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched Gaussians: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and "
                         f"{sigma2.shape}")
    roots, eigenvectors = _psd_eigenvalues_sqrt(sigma1)
    root1 = (eigenvectors * roots) @ eigenvectors.T  # the symmetric square root of S_1
    trace_root = _psd_eigenvalues_sqrt(root1 @ sigma2 @ root1)[0].sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root
    return float(max(distance, 0.0))  # a squared distance; rounding can take an exact 0 a hair below


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two sets of image features (N1, D) and (N2, D) of the same feature model."""
    return frechet_distance(*gaussian_fit(features1), *gaussian_fit(features2))


# ---- CLIP score --------------------------------------------------------------------------------


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per image-text pair, 100 * max(cos(image, text), 0), as torchmetrics' CLIPScore; rows pair up."""
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"image and text embeddings must both be (N, D); got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    cosine = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return (100 * cosine).clamp(min=0)


# ---- feature models ----------------------------------------------------------------------------


class FeatureModel:
    """A vision model (optionally with its text side) from a local transformers folder: image features for FID,
    image and text embeddings for the CLIP score. CLIP-like models (with `get_image_features`) give their
    projected image embeddings; others (e.g. DINOv2) their pooled output, else the first token's state."""

    def __init__(self, path: str, model, image_processor, tokenizer=None):
        self.path, self.model, self.image_processor, self.tokenizer = path, model, image_processor, tokenizer

    @property
    def is_clip(self) -> bool:
        return hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")

    @torch.no_grad()
    def image_features(self, images: list[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """Features (N, D) in float32 on the CPU of RGB uint8 images (H, W, 3)."""
        device, rows = self.model.device, []
        for start in range(0, len(images), batch_size):
            inputs = self.image_processor(images=list(images[start:start + batch_size]), return_tensors="pt")
            pixels = inputs["pixel_values"].to(device, self.model.dtype)
            if hasattr(self.model, "get_image_features"):
                rows.append(_pooled(self.model.get_image_features(pixel_values=pixels)))
            else:
                output = self.model(pixel_values=pixels)
                pooled = getattr(output, "pooler_output", None)
                rows.append(pooled if pooled is not None else output.last_hidden_state[:, 0])
        return torch.cat(rows).float().cpu()

    @torch.no_grad()
    def text_features(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Text embeddings (N, D) in float32 on the CPU (CLIP-like models with a tokenizer only)."""
        if not self.is_clip or self.tokenizer is None:
            raise ValueError(f"{self.path}: the CLIP score needs a model with a text side and its tokenizer (a "
                             f"CLIPModel folder); this is a {type(self.model).__name__}")
        rows, max_length = [], min(self.tokenizer.model_max_length, 77)
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                    max_length=max_length, return_tensors="pt").to(self.model.device)
            rows.append(_pooled(self.model.get_text_features(**tokens)))
        return torch.cat(rows).float().cpu()


def _pooled(output) -> torch.Tensor:
    """transformers 5's get_*_features return a model output whose pooler_output is the projected embedding."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_feature_model(path: str, flag: str, needs_text: bool, device: torch.device | str = "cpu") -> FeatureModel:
    """The feature model in the local folder `path` (safetensors weights only; never a download); a path that is not
    such a folder is an error naming `flag` and what to put there. `needs_text`: also its tokenizer (CLIP score)."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: not a folder with a config.json; give {CLIP_DOWNLOAD_HINT}")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{flag} {path}: no *.safetensors weights there (pickled weights such as "
                                f"pytorch_model.bin are never loaded); give {CLIP_DOWNLOAD_HINT}")
    model = AutoModel.from_pretrained(folder, use_safetensors=True, local_files_only=True).to(device).eval()
    feature_model = FeatureModel(str(path), model, AutoImageProcessor.from_pretrained(folder, local_files_only=True))
    if needs_text and not feature_model.is_clip:
        raise ValueError(f"{flag} {path}: a {type(model).__name__} has no text side; the CLIP score needs "
                         f"{CLIP_DOWNLOAD_HINT}")
    if needs_text:
        feature_model.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return feature_model
