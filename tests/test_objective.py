"""The training objective: targets by prediction type, min-SNR weights, the loss."""

import pytest
import torch

from finetune.objective import diffusion_loss, min_snr_weights, sample_noise_and_timesteps, training_target
from pipelines import DDPMScheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_target_recovers_x0_through_the_scheduler(prediction_type):
    """A model that outputs the exact target makes the scheduler's x_0 estimate exact."""
    scheduler = DDPMScheduler(prediction_type=prediction_type, clip_sample=False)
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    noise, _ = sample_noise_and_timesteps(x0, 1000)
    for t in (10, 500, 990):
        timesteps = torch.full((3,), t)
        xt = scheduler.add_noise(x0, noise, timesteps)
        target = training_target(scheduler, x0, noise, timesteps)
        step = scheduler.step(target, t, xt, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(step.pred_original_sample, x0, rtol=1e-3, atol=1e-3)


def test_noise_and_timesteps_follow_the_global_rng():
    x = torch.zeros(8, 3, 4, 4)
    torch.manual_seed(3)
    a = sample_noise_and_timesteps(x, 1000)
    torch.manual_seed(3)
    b = sample_noise_and_timesteps(x, 1000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].min() >= 0 and a[1].max() < 1000


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    timesteps = torch.tensor([0, 100, 500, 999])
    snr = scheduler.snr(timesteps)
    weights = min_snr_weights(scheduler, timesteps, 5.0)
    expected = {"epsilon": torch.clamp(snr, max=5) / snr, "v_prediction": torch.clamp(snr, max=5) / (snr + 1),
                "sample": torch.clamp(snr, max=5)}[prediction_type]
    torch.testing.assert_close(weights, expected)
    if prediction_type == "epsilon":  # nearly clean steps are down-weighted, noisy ones keep weight 1
        assert weights[0] < 0.01 and weights[-1] == 1


def test_weighted_loss():
    pred, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert diffusion_loss(pred, target).item() == pytest.approx(2.5)
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    assert diffusion_loss(pred.bfloat16(), target).dtype == torch.float32
