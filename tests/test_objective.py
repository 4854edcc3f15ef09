"""The training objective: targets by prediction type, min-SNR weights, the loss."""

import pytest
import torch

from finetune.models import check_objective
from finetune.objective import (
    diffusion_loss,
    min_snr_weights,
    on_device,
    perturb_noise,
    sample_noise_and_timesteps,
    training_target,
)
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


def test_noise_offset_shifts_each_channel_by_a_constant():
    """eps + offset * c with one c ~ N(0, 1) per (sample, channel): the difference to plain eps is constant over
    pixels, its spread is the offset, and the timesteps are those plain noise would get (the target is this eps)."""
    x = torch.zeros(512, 3, 4, 4)
    torch.manual_seed(0)
    plain, plain_t = sample_noise_and_timesteps(x, 1000)
    torch.manual_seed(0)
    shifted, shifted_t = sample_noise_and_timesteps(x, 1000, noise_offset=0.1)
    diff = shifted - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    assert diff[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.1)
    assert shifted_t.shape == plain_t.shape


def test_input_perturbation_changes_the_input_not_the_target():
    scheduler = DDPMScheduler()
    x0, timesteps = torch.rand(256, 3, 4, 4), torch.full((256,), 500)
    torch.manual_seed(0)
    noise, _ = sample_noise_and_timesteps(x0, 1000)
    assert perturb_noise(noise, 0.0) is noise
    perturbed = perturb_noise(noise, 0.1)
    assert (perturbed - noise).std().item() == pytest.approx(0.1, rel=0.05)
    # x_t is built from the perturbed noise; the epsilon target is still the original noise.
    xt = scheduler.add_noise(x0, perturbed, timesteps)
    assert not torch.allclose(xt, scheduler.add_noise(x0, noise, timesteps))
    assert training_target(scheduler, x0, noise, timesteps) is noise


def test_zero_terminal_snr():
    """Lin et al. 2023: the last step is pure noise (SNR 0); min-SNR weights stay finite there, and a schedule
    like that is refused for epsilon prediction, which cannot be sampled from pure noise."""
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert scheduler.alphas_cumprod[-1] == 0 and scheduler.alphas_cumprod[0] > 0.99
    timesteps = torch.tensor([0, 500, 999])
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        scheduler.register_to_config(prediction_type=prediction_type)
        weights = min_snr_weights(scheduler, timesteps, 5.0)
        assert torch.isfinite(weights).all(), prediction_type
    check_objective(DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="v_prediction"):
        check_objective(DDPMScheduler(rescale_betas_zero_snr=True))


def test_v_prediction_target_is_the_velocity():
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022)."""
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    x0, noise, timesteps = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([10, 900])
    a = scheduler.alphas_cumprod[timesteps].reshape(2, 1, 1, 1)
    torch.testing.assert_close(training_target(scheduler, x0, noise, timesteps), a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_the_training_copy_of_the_schedule_gives_the_same_numbers_and_leaves_the_original():
    """`on_device` copies the scheduler for the training step (its alpha_bar table on the training device);
    the scheduler that sampling uses keeps its own table, and every training quantity is unchanged."""
    scheduler = DDPMScheduler(prediction_type="v_prediction", clip_sample=False)
    table = scheduler.alphas_cumprod
    moved = on_device(scheduler, torch.device("meta"))  # a device other than the CPU, without one
    assert moved.alphas_cumprod.device.type == "meta" and moved.config is scheduler.config
    assert scheduler.alphas_cumprod is table and table.device.type == "cpu"
    copy = on_device(scheduler, torch.device("cpu"))
    torch.manual_seed(0)
    samples, noise, timesteps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    for method in ("add_noise", "get_velocity"):
        assert torch.equal(getattr(copy, method)(samples, noise, timesteps),
                           getattr(scheduler, method)(samples, noise, timesteps))
    assert torch.equal(min_snr_weights(copy, timesteps, 5.0), min_snr_weights(scheduler, timesteps, 5.0))


@pytest.mark.parametrize("overrides,spacing,first", [
    ([], "leading", 980),
    (["model.rescale_betas_zero_snr=true", "model.prediction_type=v_prediction"], "trailing", 999),
    (["model.rescale_betas_zero_snr=true", "model.prediction_type=v_prediction", "model.timestep_spacing=leading"],
     "leading", 980),
])
def test_zero_terminal_snr_samples_from_the_terminal_step(overrides, spacing, first):
    """With a zero-terminal-SNR schedule the model learns pure noise at t = T-1 only, so 50 sampling steps start
    there (`trailing`; Lin et al. 2023, section 3.3), not at t = 980 as `leading` spacing does."""
    from finetune.config import load_config
    from finetune.data import shapes
    from finetune.models import build_components

    config = load_config(None, overrides).model
    scheduler = build_components(config, 8, shapes.all_captions()).scheduler
    scheduler.set_timesteps(50)
    assert scheduler.config.timestep_spacing == spacing and int(scheduler.timesteps[0]) == first


def test_timestep_spacing_switches_a_base(tiny_pipeline, tmp_path):
    from finetune.config import ModelConfig
    from finetune.models import load_components

    tiny_pipeline.save_pretrained(tmp_path / "base")
    config = ModelConfig(pretrained_model_name_or_path=str(tmp_path / "base"), timestep_spacing="trailing")
    assert load_components(config).scheduler.config.timestep_spacing == "trailing"
    assert load_components(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "base"))).scheduler.config[
        "timestep_spacing"] == "leading"
