"""The diffusion training objective: timesteps, noise, targets and the loss.

Ho et al. 2020, Algorithm 1: take x_0, draw t ~ U{0..T-1} and eps ~ N(0, I), form
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps and regress the model's output on the target.
Noise and timesteps come from the global torch RNG (the CPU's, so a run draws the same numbers on any device),
which accelerate saves per process in checkpoints. On a GPU they are drawn into pinned memory and copied without
a host sync, and the schedule's tables live on the GPU (`on_device`): a step then never waits for the GPU to
finish the previous one before it can queue its own kernels.
"""

import copy

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from pipelines import DDPMScheduler


def sample_noise_and_timesteps(samples: torch.Tensor, num_train_timesteps: int,
                               noise_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """eps ~ N(0, I) shaped like `samples` and t ~ U{0, ..., T-1}, one per sample.

    With `noise_offset` > 0, eps also gets a constant per (sample, channel) drawn from N(0, noise_offset^2)
    (the "offset noise" of Guttenberg 2023): plain eps never shifts a whole channel, so the model cannot learn
    images much darker or brighter than the mean. The shifted eps is also the epsilon target."""
    noise = _draw(torch.randn, samples.shape, dtype=samples.dtype, device=samples.device)
    if noise_offset:
        shape = (samples.shape[0], samples.shape[1], *[1] * (samples.ndim - 2))
        noise = noise + noise_offset * _draw(torch.randn, shape, dtype=samples.dtype, device=samples.device)
    timesteps = _draw(torch.randint, 0, num_train_timesteps, (samples.shape[0],), device=samples.device)
    return noise, timesteps


def _draw(factory, *args, device: torch.device, **kwargs) -> torch.Tensor:
    """`factory(*args)` from the CPU generator, on `device`. For a GPU the draw goes into pinned memory and is
    copied without blocking (a copy from pageable memory waits for every kernel queued before it)."""
    pin = device.type == "cuda"
    return factory(*args, **kwargs, pin_memory=pin).to(device, non_blocking=pin)


def on_device(scheduler: DDPMScheduler, device: torch.device) -> DDPMScheduler:
    """A copy of `scheduler` for the training step, its alpha_bar table on `device`: add_noise, get_velocity and
    compute_snr gather from it at every step, and a table on the host is copied over each time (a host sync, on a
    GPU between the forward and the backward pass). The original stays as it is for sampling."""
    scheduler = copy.copy(scheduler)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return scheduler


def perturb_noise(noise: torch.Tensor, input_perturbation: float) -> torch.Tensor:
    """The noise that forms x_t under input perturbation (Ning et al. 2023, https://arxiv.org/abs/2301.11706):
    eps + gamma * xi with xi ~ N(0, I), while the target stays eps. Training then sees inputs like the slightly
    wrong ones of its own sampling (exposure bias). gamma = 0 returns `noise` itself."""
    if not input_perturbation:
        return noise
    return noise + input_perturbation * _draw(torch.randn, noise.shape, dtype=noise.dtype, device=noise.device)


def training_target(scheduler: DDPMScheduler, samples: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the model should output at x_t, by the scheduler's prediction type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(samples, noise, timesteps)
    return samples


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, https://arxiv.org/abs/2303.09556): min(SNR_t, gamma) / SNR_t
    for epsilon targets, min(SNR_t, gamma) / (SNR_t + 1) for v targets, min(SNR_t, gamma) for x_0 targets.
    They stop the nearly clean timesteps from dominating the gradient."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":  # at zero SNR (a zero-terminal-SNR schedule's last step) the limit is 1
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                   pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The simplified objective L_simple (eq. 14): mean squared error in float32, optionally weighted per sample
    and per pixel (`mask_weights`)."""
    if weights is None and pixel_weights is None:
        return F.mse_loss(model_pred.float(), target.float())
    if weights is None:
        return (F.mse_loss(model_pred.float(), target.float(), reduction="none") * pixel_weights).mean()
    return (sample_losses(model_pred, target, pixel_weights) * weights).mean()


def sample_losses(model_pred: torch.Tensor, target: torch.Tensor,
                  pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean squared error (float32), weighted per pixel when `pixel_weights` are given."""
    squared = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if pixel_weights is not None:
        squared = squared * pixel_weights
    return squared.mean(dim=tuple(range(1, target.ndim)))


def dataset_loss(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                 pixel_weights: torch.Tensor | None, loss_weight: torch.Tensor,
                 regularisation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """With data.sources: the batch mean of each sample's loss times its dataset's `loss_weight` (and its min-SNR
    `weights`), as kohya weighs regularisation images by prior_loss_weight; and, detached for the logs, the sums
    and counts of the instance and the regularisation samples' losses (before the dataset weight):
    [instance sum, instance count, regularisation sum, regularisation count]."""
    losses = sample_losses(model_pred, target, pixel_weights)
    if weights is not None:
        losses = losses * weights
    loss = (losses * loss_weight.to(losses.device, losses.dtype, non_blocking=True)).mean()  # (pinned on a GPU:
    regularisation = regularisation.to(losses.device, losses.dtype, non_blocking=True)  # no wait for the queue)
    instance, seen = losses.detach(), 1 - regularisation
    return loss, torch.stack([(instance * seen).sum(), seen.sum(), (instance * regularisation).sum(),
                              regularisation.sum()])


def mask_weights(mask: torch.Tensor | None, samples: torch.Tensor, unmasked_weight: float,
                 normalize: bool) -> torch.Tensor | None:
    """Per-pixel loss weights from a batch's uint8 masks (B, 1, H, W), at the samples' size (a latent's pixels
    average their image's by area): 1 inside the mask, `unmasked_weight` outside, and with `normalize` divided by
    each sample's mean weight, so the loss keeps its scale however small the masked area. None without masks."""
    if mask is None:
        return None
    mask = mask.to(samples.device, non_blocking=True).float() / 255
    if mask.shape[-2:] != samples.shape[-2:]:
        mask = F.interpolate(mask, size=samples.shape[-2:], mode="area")
    weights = unmasked_weight + (1 - unmasked_weight) * mask
    if normalize:
        weights = weights / weights.mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    return weights
