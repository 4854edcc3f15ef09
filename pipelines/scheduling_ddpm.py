"""DDPM scheduler: the forward process q(x_t | x_0) and the reverse step p(x_{t-1} | x_t).

Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", 2020 (https://arxiv.org/abs/2006.11239).
Equation numbers below refer to that paper. The config names and outputs follow diffusers'
`DDPMScheduler`, so a config saved by either loads in the other and the two agree to float precision.

This file travels inside every pipeline folder the trainer writes (`scheduler/scheduling_ddpm.py`), so it
imports only torch, numpy and diffusers.
"""

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
VarianceType = Literal["fixed_small", "fixed_large"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    """One reverse step: the sample at the previous timestep and the model's estimate of x_0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (https://arxiv.org/abs/2305.08891), Algorithm 1: shift and scale sqrt(alpha_bar)
    so that the last timestep is pure noise while the first keeps its value."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather values[timesteps] and shape them to broadcast over `like` (batch first)."""
    out = values.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)].flatten()
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))


class DDPMScheduler(SchedulerMixin, ConfigMixin):
    """Denoising diffusion probabilistic model scheduler (Ho et al. 2020).

    Args:
        num_train_timesteps: T, the number of forward-process steps the model is trained with.
        beta_start, beta_end: the first and last beta of the `linear` and `scaled_linear` schedules.
        beta_schedule: `linear` (the paper), `scaled_linear` (latent diffusion), `squaredcos_cap_v2` (cosine).
        variance_type: the reverse-process variance sigma_t^2 (section 3.2): `fixed_small` is the posterior
            variance beta~_t (eq. 7), `fixed_large` is beta_t.
        clip_sample: clamp the predicted x_0 to [-clip_sample_range, clip_sample_range] before the step.
        prediction_type: what the model predicts: the noise (`epsilon`), the velocity
            v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (`v_prediction`, Salimans & Ho 2022), or x_0 (`sample`).
        timestep_spacing: how inference timesteps are spread over [0, T) (Lin et al. 2023, table 2).
        steps_offset: added to every inference timestep with `leading` spacing.
        rescale_betas_zero_snr: rescale the schedule so the last step has zero SNR (Lin et al. 2023).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        variance_type: VarianceType = "fixed_small",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        prediction_type: PredictionType = "epsilon",
        timestep_spacing: TimestepSpacing = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = cosine_betas(num_train_timesteps)
        else:
            raise ValueError(f"beta_schedule={beta_schedule!r} is not one of linear, scaled_linear, squaredcos_cap_v2")
        for name, value, allowed in [
            ("variance_type", variance_type, VarianceType),
            ("prediction_type", prediction_type, PredictionType),
            ("timestep_spacing", timestep_spacing, TimestepSpacing),
        ]:
            if value not in allowed.__args__:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed.__args__)}")
        if rescale_betas_zero_snr:
            betas = zero_terminal_snr(betas)

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    # ---- forward process -------------------------------------------------------------------------

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), eq. 4."""
        alpha_bar = _per_sample(self.alphas_cumprod, timesteps, original_samples)
        return alpha_bar**0.5 * original_samples + (1 - alpha_bar) ** 0.5 * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022)."""
        alpha_bar = _per_sample(self.alphas_cumprod, timesteps, sample)
        return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * sample

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) per timestep (for min-SNR loss weights)."""
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return alpha_bar / (1 - alpha_bar)

    # ---- reverse process -------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM feeds x_t to the model unscaled; present for interchangeability with other schedulers."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose `num_inference_steps` timesteps out of [0, T), in descending order."""
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be between 1 and {T}")
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, num_inference_steps).round()[::-1]
        elif spacing == "leading":
            timesteps = np.arange(num_inference_steps)[::-1] * (T // num_inference_steps) + self.config.steps_offset
        else:  # trailing
            timesteps = np.round(np.arange(T, 0, -T / num_inference_steps)) - 1
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64).copy()).to(device)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep after `timestep` in the reverse chain (-1 after the last one)."""
        if self.num_inference_steps is None:
            return int(timestep) - 1
        index = int((self.timesteps == timestep).nonzero()[0, 0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """One reverse step: sample x_{t_prev} ~ p(x_{t_prev} | x_t) given the model's output at x_t."""
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        # With skipped timesteps the step from t to prev_t has its own alpha and beta.
        alpha = alpha_bar / alpha_bar_prev
        beta = 1 - alpha

        # Estimate x_0 from the model output (eq. 15 for epsilon).
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original_sample = (sample - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5
        elif prediction_type == "v_prediction":
            pred_original_sample = alpha_bar**0.5 * sample - (1 - alpha_bar) ** 0.5 * model_output
        else:
            pred_original_sample = model_output
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)

        # Posterior mean mu~_t(x_t, x_0), eq. 7.
        coef_x0 = alpha_bar_prev**0.5 * beta / (1 - alpha_bar)
        coef_xt = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
        prev_sample = coef_x0 * pred_original_sample + coef_xt * sample

        # Add sigma_t z for every step but the last (Algorithm 2, line 4).
        if t > 0:
            if self.config.variance_type == "fixed_small":
                variance = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)
            else:
                variance = beta
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            prev_sample = prev_sample + variance**0.5 * noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
