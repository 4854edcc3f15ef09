"""Our DDPMScheduler against diffusers' DDPMScheduler, option by option, and its swap-ability."""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers import DDPMScheduler as ReferenceScheduler
from diffusers.training_utils import compute_snr

from pipelines import DDPMScheduler

OPTIONS = [
    dict(beta_schedule=schedule, prediction_type=prediction, variance_type=variance)
    for schedule, prediction, variance in itertools.product(
        ["linear", "scaled_linear", "squaredcos_cap_v2"], ["epsilon", "v_prediction", "sample"],
        ["fixed_small", "fixed_large"],
    )
] + [
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(timestep_spacing="linspace", clip_sample=False),
    dict(timestep_spacing="leading", steps_offset=1, clip_sample_range=0.5),
    dict(num_train_timesteps=100, beta_start=0.001, beta_end=0.05),
]


def _pair(**options):
    return DDPMScheduler(**options), ReferenceScheduler(**options)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_matches_diffusers(options):
    ours, ref = _pair(**options)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-7)

    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 7, len(ours) // 2, len(ours) - 1])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    torch.testing.assert_close(ours.snr(t), compute_snr(ref, t))

    # The full reverse chain, and a chain with skipped timesteps.
    for steps in (None, 10):
        if steps:
            ours.set_timesteps(steps)
            ref.set_timesteps(steps)
            assert ours.timesteps.tolist() == ref.timesteps.tolist()
        sample_ours = sample_ref = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        g_ours, g_ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        timesteps = ours.timesteps.tolist()
        for t in timesteps[:3] + timesteps[-2:]:
            model_output = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(t))
            a = ours.step(model_output, t, sample_ours, generator=g_ours)
            b = ref.step(model_output, t, sample_ref, generator=g_ref)
            torch.testing.assert_close(a.prev_sample, b.prev_sample)
            torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample)
            sample_ours, sample_ref = a.prev_sample, b.prev_sample


def test_forward_process_statistics():
    """q(x_t | x_0) has mean sqrt(alpha_bar) x_0 and variance 1 - alpha_bar (eq. 4)."""
    scheduler = DDPMScheduler()
    x0 = torch.full((20000,), 0.5)
    t = torch.full((20000,), 500)
    xt = scheduler.add_noise(x0, torch.randn(20000, generator=torch.Generator().manual_seed(0)), t)
    alpha_bar = scheduler.alphas_cumprod[500]
    assert abs(xt.mean() - alpha_bar.sqrt() * 0.5) < 0.02
    assert abs(xt.var() - (1 - alpha_bar)) < 0.02


def test_zero_terminal_snr():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    assert scheduler.alphas_cumprod[-1] < 1e-6
    assert scheduler.snr(torch.tensor([999]))[0] < 1e-6


@pytest.mark.parametrize("bad", [dict(beta_schedule="cosine"), dict(prediction_type="noise"),
                                 dict(variance_type="learned"), dict(timestep_spacing="uniform")])
def test_rejects_unknown_modes(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DDPMScheduler(**bad)


def test_set_timesteps_range():
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDPMScheduler(num_train_timesteps=100).set_timesteps(101)


@pytest.mark.parametrize("other", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_config_round_trips_to_other_schedulers(other, tmp_path):
    ours = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    swapped = other.from_config(ours.config)
    assert swapped.config.prediction_type == "v_prediction"
    torch.testing.assert_close(swapped.alphas_cumprod, ours.alphas_cumprod)
    ours.save_pretrained(tmp_path)
    loaded = DDPMScheduler.from_pretrained(tmp_path).config
    assert {k: v for k, v in loaded.items() if not k.startswith("_")} == {
        k: v for k, v in ours.config.items() if not k.startswith("_")
    }
    assert ReferenceScheduler.from_pretrained(tmp_path).config.beta_schedule == "squaredcos_cap_v2"
