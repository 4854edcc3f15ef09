"""Our DDPMScheduler against diffusers' DDPMScheduler, option by option and bit for bit, its swap-ability, and the
config settings it refuses rather than drops. diffusers' own DDPMScheduler tests run against it too, in
tests/diffusers_scheduler_tests/."""

import itertools
import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers import DDPMScheduler as ReferenceScheduler
from diffusers.training_utils import compute_snr

import pipelines.scheduling_ddpm as scheduling
from pipelines import DDPMScheduler

REAL_CONFIGS = Path(__file__).resolve().parent / "fixtures"  # the real bases' scheduler configs (its README.md)
# A schedule given by its betas, as a base with `trained_betas` ships it: no beta_schedule makes these.
TRAINED_BETAS = (np.linspace(1e-3, 0.2, 50) ** 1.5).tolist()

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
    dict(thresholding=True, sample_max_value=2.0),
    dict(thresholding=True, prediction_type="sample", dynamic_thresholding_ratio=0.9, sample_max_value=0.5),
    dict(thresholding=True, prediction_type="v_prediction", sample_max_value=3.0, timestep_spacing="trailing"),
    dict(num_train_timesteps=50, trained_betas=TRAINED_BETAS, variance_type="fixed_large"),
    dict(num_train_timesteps=50, trained_betas=np.array(TRAINED_BETAS), rescale_betas_zero_snr=True,
         prediction_type="v_prediction"),
]


def _pair(**options):
    return DDPMScheduler(**options), ReferenceScheduler(**options)


def _exact(actual, expected):
    """Bitwise: both schedulers run the same float32 operations in the same order."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _option_id(options):
    return ",".join(f"{k}={'<betas>' if k == 'trained_betas' else v}" for k, v in options.items())


@pytest.mark.parametrize("options", OPTIONS, ids=_option_id)
def test_matches_diffusers(options):
    ours, ref = _pair(**options)
    _exact(ours.betas, ref.betas)
    _exact(ours.alphas_cumprod, ref.alphas_cumprod)

    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 7, len(ours) // 2, len(ours) - 1])
    _exact(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    _exact(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    torch.testing.assert_close(ours.snr(t), compute_snr(ref, t))  # compute_snr takes another route to the same SNR

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
            # Scaled so that x_0 estimates leave [-1, 1] and clipping or thresholding has work to do.
            model_output = 3 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(t))
            a = ours.step(model_output, t, sample_ours, generator=g_ours)
            b = ref.step(model_output, t, sample_ref, generator=g_ref)
            _exact(a.prev_sample, b.prev_sample)
            _exact(a.pred_original_sample, b.pred_original_sample)
            _exact(ours._get_variance(t), ref._get_variance(t))
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


# ---- what diffusers' DDPMScheduler has beyond the modes above --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 4, 5)])
def test_dynamic_threshold_matches_diffusers(dtype, shape):
    x0 = (3 * torch.randn(shape, generator=torch.Generator().manual_seed(0))).to(dtype)
    x0[0] = x0[0].clamp(-0.9, 0.9)  # a sample inside [-1, 1], which thresholding leaves as it is
    for ratio, max_value in [(0.995, 1.0), (0.9, 2.0), (0.5, 0.5), (1.0, 10.0)]:
        ref = ReferenceScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
        ours = scheduling.dynamic_threshold(x0, ratio, max_value)
        assert ours.dtype == dtype
        _exact(ours, ref._threshold_sample(x0))
    _exact(scheduling.dynamic_threshold(x0, 0.9, 2.0)[0], x0[0])
    assert not torch.equal(scheduling.dynamic_threshold(x0, 0.9, 2.0), x0.clamp(-1, 1))  # not plain clipping


@pytest.mark.parametrize("options", [dict(num_train_timesteps=50, trained_betas=TRAINED_BETAS),
                                     dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)],
                         ids=["trained_betas", "thresholding"])
def test_loads_what_diffusers_saves(options, tmp_path):
    """The review's finding: a base whose schedule is given by trained_betas (or that thresholds) loaded with the
    schedule of beta_schedule (or without thresholding), because from_pretrained dropped the key unseen."""
    ReferenceScheduler(**options).save_pretrained(tmp_path)  # the scheduler folder of a base written by diffusers
    ours, ref = DDPMScheduler.from_pretrained(tmp_path), ReferenceScheduler.from_pretrained(tmp_path)
    _exact(ours.alphas_cumprod, ref.alphas_cumprod)
    assert {k: ours.config[k] for k in options} == {k: ref.config[k] for k in options}
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps.tolist():
        model_output = 3 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(t))
        a = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        b = ref.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        _exact(a.prev_sample, b.prev_sample)
        sample = a.prev_sample
    # And back: what ours saves, diffusers loads to the same schedule.
    ours.save_pretrained(tmp_path / "ours")
    _exact(ReferenceScheduler.from_pretrained(tmp_path / "ours").alphas_cumprod, ref.alphas_cumprod)


@pytest.mark.parametrize("bad", [dict(trained_betas=TRAINED_BETAS[:2]), dict(trained_betas=[0.0] * 1000),
                                 dict(trained_betas=[1.5] * 1000), dict(thresholding=True, sample_max_value=0),
                                 dict(thresholding=True, dynamic_thresholding_ratio=1.5)],
                         ids=["betas-length", "beta-zero", "beta-above-one", "max-value", "ratio"])
def test_rejects_bad_schedule_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad.keys() - {"thresholding"}))):
        DDPMScheduler(**bad)


@pytest.mark.parametrize("timesteps", [[999, 500, 20, 1, 0], [100, 87, 50, 1, 0], [7], [998, 640, 3]])
def test_custom_timesteps_match_diffusers(timesteps):
    ours, ref = _pair(clip_sample=False)
    ours.set_timesteps(timesteps=timesteps)
    ref.set_timesteps(timesteps=timesteps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist() == timesteps
    assert ours.custom_timesteps and ours.num_inference_steps == len(timesteps)
    assert [int(ours.previous_timestep(t)) for t in ours.timesteps] == timesteps[1:] + [-1]
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        model_output = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(int(t)))
        a = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)))
        b = ref.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)))
        _exact(a.prev_sample, b.prev_sample)
        _exact(ours._get_variance(t), ref._get_variance(t))
        sample = a.prev_sample
    # Back to evenly spaced steps: the custom list is forgotten.
    ours.set_timesteps(10)
    assert not ours.custom_timesteps and ours.timesteps.tolist() == list(range(900, -1, -100))


@pytest.mark.parametrize("call", [dict(timesteps=[100, 87, 50, 51, 0]), dict(timesteps=[100, 50, 50, 0]),
                                  dict(timesteps=[1000, 500]), dict(num_inference_steps=5, timesteps=[100, 0]),
                                  dict(timesteps=[10, 5, -1]), dict(timesteps=[]), dict()],
                         ids=["increasing", "repeated", "too-large", "both", "negative", "empty", "neither"])
def test_custom_timesteps_validation(call):
    """diffusers refuses the first four; it takes a negative timestep (and then indexes alpha_bar from the end), and
    fails on an empty list or no argument with an IndexError or a TypeError."""
    with pytest.raises(ValueError, match="timesteps"):
        DDPMScheduler().set_timesteps(**call)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_get_variance_matches_diffusers(variance_type):
    ours, ref = _pair(variance_type=variance_type, beta_schedule="squaredcos_cap_v2")
    for steps in (None, 7):
        if steps:
            ours.set_timesteps(steps)
            ref.set_timesteps(steps)
        for t in ours.timesteps:
            _exact(ours._get_variance(t), ref._get_variance(t))
            for other in ("fixed_small", "fixed_large"):  # the type passed in, not the config's
                _exact(ours._get_variance(t, variance_type=other), ref._get_variance(t, variance_type=other))
    with pytest.raises(ValueError, match="variance_type"):
        ours._get_variance(10, variance_type="learned_range")
    with pytest.raises(ValueError, match="predicted_variance"):
        ours._get_variance(10, predicted_variance=torch.zeros(1))


# ---- settings it does not follow: refused, never dropped -------------------------------------------------------------

REFUSED = [
    dict(_class_name="EulerDiscreteScheduler", use_karras_sigmas=True),
    dict(_class_name="DPMSolverMultistepScheduler", use_lu_lambdas=True),
    dict(_class_name="EulerDiscreteScheduler", timestep_type="continuous"),
    dict(_class_name="UniPCMultistepScheduler", use_flow_sigmas=True, flow_shift=3.0),
    dict(_class_name="EDMEulerScheduler", sigma_data=0.5, sigma_min=0.002),
    dict(_class_name="FlowMatchEulerDiscreteScheduler", shift=3.0),
    dict(_class_name="LCMScheduler", timestep_scaling=10.0),
    dict(_class_name="DDPMScheduler", predict_epsilon=False),  # diffusers before 0.10: now prediction_type="sample"
    dict(_class_name="DDPMScheduler", predicton_type="v_prediction"),  # a typo
]


def _refused(config):
    return next(k for k in config if not k.startswith("_") and k not in ("flow_shift", "sigma_min"))


@pytest.mark.parametrize("config", REFUSED, ids=_refused)
def test_refuses_settings_it_does_not_follow(config, tmp_path):
    """Through from_config, from a saved folder, and as an override to from_pretrained; the error names the key."""
    key = _refused(config)
    with pytest.raises(ValueError, match=rf"{key}=.*Delete them from the scheduler config"):
        DDPMScheduler.from_config(config)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=key):
        DDPMScheduler.from_pretrained(tmp_path)
    DDPMScheduler().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=key):
        DDPMScheduler.from_pretrained(tmp_path / "plain", **{key: config[key]})


def test_refusal_names_every_setting():
    with pytest.raises(ValueError) as error:
        DDPMScheduler.from_config({"use_karras_sigmas": True, "sigma_data": 0.5, "set_alpha_to_one": False})
    message = str(error.value)
    assert "use_karras_sigmas=True (accepted only as False)" in message and "sigma_data=0.5" in message
    assert "set_alpha_to_one" not in message and "prediction_type" in message  # the settings it does take


KARRAS_SCHEDULERS = [getattr(diffusers, e.name) for e in diffusers.schedulers.KarrasDiffusionSchedulers
                     if e.name not in ("DDPMScheduler", "EDMEulerScheduler", "DPMSolverSDEScheduler")]


@pytest.mark.parametrize("other", KARRAS_SCHEDULERS, ids=lambda c: c.__name__)
def test_loads_other_schedulers_configs(other, tmp_path):
    """What the samplers diffusers calls compatible save (each option at its default, Stable Diffusion's schedule)
    loads, with that schedule, and keeps their options for a swap back. EDMEuler (another model parameterisation)
    is refused above; DPMSolverSDE needs torchsde. DPM-Solver writes variance_type: null (no learned variance)."""
    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    other(**{k: v for k, v in sd.items() if k in other().config}).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    ours = DDPMScheduler.from_pretrained(tmp_path)
    _exact(ours.alphas_cumprod, ReferenceScheduler(**sd).alphas_cumprod)
    assert ours.config.variance_type == "fixed_small"
    kept = {k: v for k, v in saved.items() if not k.startswith("_") and k != "variance_type"}
    assert {k: ours.config[k] for k in kept} == kept
    swapped_back, original = other.from_config(ours.config).config, other.from_pretrained(tmp_path).config
    assert {k: v for k, v in swapped_back.items() if not k.startswith("_")} == {
        k: v for k, v in original.items() if not k.startswith("_")}


@pytest.mark.parametrize("base", ["sd15", "sd21-base", "sdxl"])
def test_loads_real_base_schedulers(base):
    """The published scheduler configs of the bases users fine-tune most (PNDM with set_alpha_to_one and
    skip_prk_steps, SDXL's Euler with use_karras_sigmas: false) load, with diffusers' schedule."""
    folder = REAL_CONFIGS / base
    ours = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    _exact(ours.alphas_cumprod, ReferenceScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod)
    assert ours.config.steps_offset == 1 and ours.config.set_alpha_to_one is False
