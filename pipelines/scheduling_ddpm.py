"""DDPM scheduler: the forward process q(x_t | x_0) and the reverse step p(x_{t-1} | x_t).

Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", 2020 (https://arxiv.org/abs/2006.11239).
Equation numbers below refer to that paper. The config names and outputs follow diffusers'
`DDPMScheduler`, so a config saved by either loads in the other and the two compute the same bits. Unlike
diffusers, a config setting this scheduler does not follow is refused, never dropped (`extract_init_dict`).

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
# diffusers also takes `fixed_small_log`, `fixed_large_log` (variants of these two), `learned` and `learned_range`
# (for a model that outputs its variance as extra channels, which this project's models do not), and treats any other
# string as `fixed_small`. Here they are refused: a typo must not pick a variance.
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


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, https://arxiv.org/abs/2205.11487, section 2.3): per
    sample, s is the `ratio` quantile of |x_0| clamped to [1, max_value]; x_0 is clipped to [-s, s] and divided by
    s. With s = 1 this is plain clipping to [-1, 1]; a larger s pulls saturated pixels inwards instead."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # torch.quantile takes only float32 and float64
    s = torch.clamp(torch.quantile(flat.abs(), ratio, dim=1), min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather values[timesteps] and shape them to broadcast over `like` (batch first)."""
    out = values.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)].flatten()
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))


# ---- settings other schedulers write -------------------------------------------------------------------------------
#
# diffusers' `from_config` (and so `from_pretrained`) drops every config key `__init__` does not take: silently when a
# scheduler in `_compatibles` takes it, with a logged warning otherwise. A base whose schedule hung on such a key
# would then train and sample on another schedule. Here every key `__init__` takes is honoured (`steps_offset`,
# `trained_betas`, `thresholding`... as other schedulers write them), and every other key, in the config or passed to
# from_config / from_pretrained, must be of one of the two kinds below, or it is refused. Keys starting with "_"
# (`_class_name`, `_diffusers_version`) are diffusers' bookkeeping and pass; so do the keys a live scheduler's config
# lists in `_use_default_values` (the other class's defaults, which diffusers does not pass on either).

# Options of other samplers' integrators, harmless at any value: a DDPM step has nothing they could choose, and none
# enters the forward process q(x_t | x_0) that training uses, the model's inputs, or Algorithm 2. from_config keeps them
# in the config, unused, so that swapping back to their scheduler restores them (diffusers' DDPMScheduler does the
# same). Stable Diffusion 1.x and 2.x ship a PNDMScheduler config with set_alpha_to_one: false and
# skip_prk_steps: true, SDXL an EulerDiscreteScheduler one with both.
OTHER_SAMPLERS_OPTIONS = frozenset({
    "set_alpha_to_one",  # DDIM, PNDM, LCM: the alpha_bar their last step lands on; DDPM's last step lands on x_0
    "skip_prk_steps",  # PNDM: whether to warm up with Runge-Kutta steps
    "solver_order", "solver_type", "algorithm_type", "lower_order_final", "euler_at_final",  # multistep solvers
    "predict_x0", "disable_corrector", "solver_p",  # UniPC's predictor and corrector
    "lambda_min_clipped",  # DPM-Solver: a floor on log-SNR for its numerics
    "final_sigmas_type",  # sigma-based samplers: the noise level of their last step
    "interpolation_type",  # Euler: how sigma is interpolated between integer timesteps; DDPM visits only integers
    "flow_shift", "time_shift_type",  # inert unless use_flow_sigmas / use_dynamic_shifting, refused below
})

# Choices that would change which noise levels sampling visits, or mark another kind of model: carried only at the
# value that switches them off, refused otherwise.
SWITCHED_OFF = {
    "use_karras_sigmas": False,  # noise levels of Karras et al. 2022 instead of `timestep_spacing`
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,  # DPM-Solver: steps uniform in log-SNR
    "sigma_min": None,  # Euler, UniPC: bounds of those noise levels; EDM and VE models: their noise range
    "sigma_max": None,
    "timestep_type": "discrete",  # Euler: "continuous" feeds the model 0.25 log(sigma), another parameterisation
    "use_flow_sigmas": False,  # a flow-matching model: another forward process
    "use_dynamic_shifting": False,  # flow matching: a resolution-dependent shift of the timesteps
    "shift_terminal": None,  # UniPC for flow-matching models: where the shifted timesteps end
}


class DDPMScheduler(SchedulerMixin, ConfigMixin):
    """Denoising diffusion probabilistic model scheduler (Ho et al. 2020).

    Args:
        num_train_timesteps: T, the number of forward-process steps the model is trained with.
        beta_start, beta_end: the first and last beta of the `linear` and `scaled_linear` schedules.
        beta_schedule: `linear` (the paper), `scaled_linear` (latent diffusion), `squaredcos_cap_v2` (cosine).
        trained_betas: the T betas themselves; when given, `beta_start`, `beta_end` and `beta_schedule` are not used.
        variance_type: the reverse-process variance sigma_t^2 (section 3.2): `fixed_small` is the posterior
            variance beta~_t (eq. 7), `fixed_large` is beta_t.
        clip_sample: clamp the predicted x_0 to [-clip_sample_range, clip_sample_range] before the step.
        clip_sample_range: see `clip_sample`.
        prediction_type: what the model predicts: the noise (`epsilon`), the velocity
            v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (`v_prediction`, Salimans & Ho 2022), or x_0 (`sample`).
        thresholding: Imagen's dynamic thresholding of the predicted x_0 (`dynamic_threshold`), in place of
            `clip_sample`. For pixel-space models: latents do not live in [-1, 1].
        dynamic_thresholding_ratio: the quantile of |x_0| that sets the threshold s.
        sample_max_value: the largest s.
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
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: VarianceType = "fixed_small",
        clip_sample: bool = True,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: TimestepSpacing = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float32).clone()
            if betas.shape != (num_train_timesteps,):
                raise ValueError(f"trained_betas has shape {list(betas.shape)}: it must hold one beta per training "
                                 f"timestep, num_train_timesteps={num_train_timesteps}")
            if not bool(((betas > 0) & (betas <= 1)).all()):
                raise ValueError(f"trained_betas must lie in (0, 1]; got values from {betas.min().item():.4g} to "
                                 f"{betas.max().item():.4g}")
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = cosine_betas(num_train_timesteps)
        else:
            raise ValueError(f"beta_schedule={beta_schedule!r} is not one of linear, scaled_linear, squaredcos_cap_v2 "
                             "(or give the betas themselves as trained_betas)")
        for name, value, allowed in [
            ("variance_type", variance_type, VarianceType),
            ("prediction_type", prediction_type, PredictionType),
            ("timestep_spacing", timestep_spacing, TimestepSpacing),
        ]:
            if value not in allowed.__args__:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed.__args__)}")
        if thresholding and not (0 < dynamic_thresholding_ratio <= 1 and sample_max_value > 0):
            raise ValueError(f"thresholding needs 0 < dynamic_thresholding_ratio <= 1 and sample_max_value > 0; got "
                             f"{dynamic_thresholding_ratio} and {sample_max_value}")
        if rescale_betas_zero_snr:
            betas = zero_terminal_snr(betas)

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs) -> tuple[dict, dict, dict]:
        """diffusers' split of a config and `from_config`'s keyword arguments into `__init__` arguments and the rest,
        after refusing every key of the rest that is neither another sampler's option nor a choice switched off
        (see OTHER_SAMPLERS_OPTIONS and SWITCHED_OFF above). All refused keys are named in one error."""
        left_at_default = set(config_dict.get("_use_default_values", []))
        if "variance_type" in config_dict and config_dict["variance_type"] is None:
            # DPM-Solver and SA-Solver write variance_type: null for a model that does not output its variance. For
            # DDPM that is a config without the key: the default, fixed_small (diffusers' DDPMScheduler does the same).
            config_dict = {k: v for k, v in config_dict.items() if k != "variance_type"}
        settings = {k: v for k, v in config_dict.items() if k not in left_at_default} | kwargs
        takes = cls._get_init_keys(cls)
        refused = []
        for key, value in settings.items():
            if key.startswith("_") or key in takes or key in OTHER_SAMPLERS_OPTIONS:
                continue
            if key in SWITCHED_OFF and value == SWITCHED_OFF[key]:
                continue
            off = f" (accepted only as {SWITCHED_OFF[key]!r})" if key in SWITCHED_OFF else ""
            refused.append(f"{key}={value!r}{off}")
        if refused:
            raise ValueError(
                f"{cls.__name__} does not follow these settings: {', '.join(refused)}; it would train and sample as "
                "if they were absent. Delete them from the scheduler config (scheduler/scheduler_config.json) if the "
                f"model does not depend on them, or use the scheduler they belong to. {cls.__name__}'s own settings "
                f"are {', '.join(sorted(takes - {'self'}))}")
        return super().extract_init_dict(config_dict, **kwargs)

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

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Choose `num_inference_steps` timesteps out of [0, T), in descending order, or take the given `timesteps`
        (strictly descending, each in [0, T))."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps takes exactly one of num_inference_steps and timesteps; got "
                             f"num_inference_steps={num_inference_steps}, timesteps={timesteps}")
        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.int64)
            if timesteps.ndim != 1 or len(timesteps) == 0 or (np.diff(timesteps) >= 0).any():
                raise ValueError(f"timesteps must be a non-empty list in strictly descending order; got "
                                 f"{timesteps.tolist()}")
            if timesteps[0] >= T or timesteps[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {T}) (num_train_timesteps={T}); got {timesteps.tolist()}")
            self.num_inference_steps, self.custom_timesteps = len(timesteps), True
            self.timesteps = torch.from_numpy(timesteps).to(device)
            return
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be between 1 and {T}")
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, num_inference_steps).round()[::-1]
        elif spacing == "leading":
            timesteps = np.arange(num_inference_steps)[::-1] * (T // num_inference_steps) + self.config.steps_offset
        else:  # trailing
            timesteps = np.round(np.arange(T, 0, -T / num_inference_steps)) - 1
        self.num_inference_steps, self.custom_timesteps = num_inference_steps, False
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64).copy()).to(device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep after `timestep` in the reverse chain (-1 after the last one); once timesteps are set, a
        0-d tensor, as diffusers returns it."""
        if self.num_inference_steps is None:
            return timestep - 1
        index = int((self.timesteps == timestep).nonzero()[0, 0])
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else torch.tensor(-1)

    def _alpha_bars(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_bar at t and at the timestep the step from t goes to (1 after the last step: x_0 itself)."""
        prev_t = int(self.previous_timestep(t))
        return self.alphas_cumprod[t], self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)

    def _get_variance(self, t: int, predicted_variance: torch.Tensor | None = None,
                      variance_type: VarianceType | None = None) -> torch.Tensor:
        """sigma_t^2 of the step from t (section 3.2), by `variance_type` (default: the config's). With skipped
        timesteps, beta_t is the step's own 1 - alpha_bar_t / alpha_bar_prev. Named and called as diffusers'
        DDPMScheduler's; `predicted_variance` serves only the learned variance types, which are refused here."""
        variance_type = variance_type or self.config.variance_type
        if variance_type not in VarianceType.__args__:
            raise ValueError(f"variance_type={variance_type!r} is not one of {', '.join(VarianceType.__args__)}")
        if predicted_variance is not None:
            raise ValueError("predicted_variance is for a model that outputs its variance (diffusers' learned "
                             "variance types); this scheduler's variances are fixed")
        alpha_bar, alpha_bar_prev = self._alpha_bars(int(t))
        beta = 1 - alpha_bar / alpha_bar_prev
        if variance_type == "fixed_large":
            return beta
        # The posterior variance beta~_t, eq. 7; floored at 1e-20 as in diffusers (it is 0 at the last step).
        return torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)

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
        alpha_bar, alpha_bar_prev = self._alpha_bars(t)
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
        if self.config.thresholding:
            pred_original_sample = dynamic_threshold(pred_original_sample, self.config.dynamic_thresholding_ratio,
                                                     self.config.sample_max_value)
        elif self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)

        # Posterior mean mu~_t(x_t, x_0), eq. 7.
        coef_x0 = alpha_bar_prev**0.5 * beta / (1 - alpha_bar)
        coef_xt = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
        prev_sample = coef_x0 * pred_original_sample + coef_xt * sample

        # Add sigma_t z for every step but the last (Algorithm 2, line 4).
        if t > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            prev_sample = prev_sample + self._get_variance(t) ** 0.5 * noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
