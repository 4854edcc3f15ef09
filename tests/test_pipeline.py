"""TextToImageDDPMPipeline: the diffusers contract, determinism, guidance, callbacks, portable folders."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from pipelines import DDPMScheduler, TextToImageDDPMPipeline


def _run(pipe, **kwargs):
    kwargs = {"num_inference_steps": 3, "generator": torch.Generator().manual_seed(0), **kwargs}
    return pipe("a red circle", **kwargs)


@pytest.mark.parametrize("output_type,expected", [("np", (2, 8, 8, 3)), ("pt", (2, 3, 8, 8)),
                                                  ("latent", (2, 3, 8, 8))])
def test_output_shapes(tiny_pipeline, output_type, expected):
    images = _run(tiny_pipeline, num_images_per_prompt=2, output_type=output_type).images
    assert tuple(images.shape) == expected
    if output_type != "latent":
        assert float(images.min()) >= 0 and float(images.max()) <= 1


def test_pil_and_prompt_lists(tiny_pipeline):
    images = tiny_pipeline(["a red circle", "a blue square"], num_images_per_prompt=3, num_inference_steps=2).images
    assert len(images) == 6 and images[0].size == (8, 8)


def test_deterministic_with_generator(tiny_pipeline):
    a = _run(tiny_pipeline, output_type="np").images
    b = _run(tiny_pipeline, output_type="np").images
    c = _run(tiny_pipeline, output_type="np", generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_latents_argument_fixes_the_start(tiny_pipeline):
    latents = torch.randn(1, 3, 8, 8)
    a = _run(tiny_pipeline, latents=latents, output_type="np").images
    b = _run(tiny_pipeline, latents=latents.clone(), output_type="np").images
    np.testing.assert_array_equal(a, b)


def test_guidance_is_one_batched_unet_call_per_step(tiny_pipeline):
    calls = []
    hook = tiny_pipeline.unet.register_forward_hook(lambda m, args, kwargs_out: calls.append(args[0].shape[0]))
    try:
        _run(tiny_pipeline, guidance_scale=3.0, num_images_per_prompt=2)
        assert calls == [4, 4, 4]  # unconditional and conditional halves together
        calls.clear()
        _run(tiny_pipeline, guidance_scale=1.0, num_images_per_prompt=2)
        assert calls == [2, 2, 2]
    finally:
        hook.remove()


def test_guidance_formula(tiny_pipeline):
    """eps = eps(negative) + w (eps(prompt) - eps(negative)), checked against a hand-made step."""
    pipe, latents = tiny_pipeline, torch.randn(1, 3, 8, 8)
    out = pipe("a red circle", negative_prompt="a blue square", guidance_scale=4.0, num_inference_steps=1,
               latents=latents, output_type="latent").images
    cond, uncond = pipe.encode_prompt(["a red circle"], "cpu"), pipe.encode_prompt(["a blue square"], "cpu")
    t = int(pipe.scheduler.timesteps[0])
    with torch.no_grad():
        eps_c, eps_u = (pipe.unet(latents, t, encoder_hidden_states=e).sample for e in (cond, uncond))
    expected = pipe.scheduler.step(eps_u + 4.0 * (eps_c - eps_u), t, latents).prev_sample
    torch.testing.assert_close(out, expected)
    # Without guidance (w <= 1) the negative prompt is not used at all.
    a = _run(pipe, negative_prompt="a blue square", output_type="np").images
    np.testing.assert_array_equal(a, _run(pipe, output_type="np").images)


def test_callback_on_step_end(tiny_pipeline):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, int(t), tuple(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = _run(tiny_pipeline, callback_on_step_end=callback, return_trajectory=True, output_type="latent")
    assert [s[0] for s in seen] == [0, 1, 2]
    assert [s[1] for s in seen] == out.timesteps
    assert all(s[2] == ("latents",) for s in seen)
    assert torch.count_nonzero(out.images) == 0  # the callback's latents were used


def test_trajectory(tiny_pipeline):
    out = _run(tiny_pipeline, return_trajectory=True, output_type="pt", num_inference_steps=4)
    assert len(out.trajectory) == 5 and len(out.pred_original_samples) == 4
    assert len(out.timesteps) == 4 and out.timesteps == sorted(out.timesteps, reverse=True)
    torch.testing.assert_close(out.images, (out.trajectory[-1] / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("kwargs,name", [
    (dict(prompt=""), None), (dict(prompt=3), "prompt"), (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"), (dict(output_type="jpeg"), "output_type"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"), (dict(height=7), "height"),
    (dict(latents=torch.randn(2, 3, 8, 8)), "latents"), (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
])
def test_invalid_arguments_name_the_argument(tiny_pipeline, kwargs, name):
    prompt = kwargs.pop("prompt", "a red circle")
    kwargs.setdefault("num_inference_steps", 1)
    if name is None:  # an empty prompt is valid: it is the unconditional caption
        tiny_pipeline(prompt, **kwargs)
        return
    with pytest.raises(ValueError, match=name):
        tiny_pipeline(prompt, **kwargs)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_swap_scheduler(tiny_pipeline, scheduler_cls):
    tiny_pipeline.scheduler = scheduler_cls.from_config(tiny_pipeline.scheduler.config)
    images = _run(tiny_pipeline, output_type="np").images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()


def test_save_and_load_with_the_project(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_text2image_ddpm", "TextToImageDDPMPipeline"]
    assert index["scheduler"] == ["scheduling_ddpm", "DDPMScheduler"]
    assert (tmp_path / "pipeline_text2image_ddpm.py").is_file()
    assert (tmp_path / "scheduler" / "scheduling_ddpm.py").is_file()
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))

    loaded = TextToImageDDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded) is TextToImageDDPMPipeline and type(loaded.scheduler) is DDPMScheduler
    loaded.set_progress_bar_config(disable=True)
    # Bitwise, not within a tolerance: weights mapped from the file at unaligned addresses made float32 kernels
    # sum in another order (58 of 192 values off by up to 8.6e-7); the pipeline gives them aligned storage.
    weights = [t for m in (loaded.unet, loaded.text_encoder) for t in [*m.parameters(), *m.buffers()]]
    assert all(t.data_ptr() % 64 == 0 for t in weights)
    np.testing.assert_array_equal(_run(tiny_pipeline, output_type="np").images, _run(loaded, output_type="np").images)


DOWNSTREAM = textwrap.dedent("""
    import importlib.util, sys, json
    sys.path.append({purelib!r})
    assert importlib.util.find_spec("pipelines") is None and importlib.util.find_spec("finetune") is None
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained({folder!r}, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    np.save({out!r}, images)
    pipe.save_pretrained({resaved!r})
    again = DiffusionPipeline.from_pretrained({resaved!r}, trust_remote_code=True)
    print(type(pipe).__name__, type(pipe.scheduler).__name__, type(again).__name__)
""")


def test_loads_downstream_without_the_project(tiny_pipeline, tmp_path):
    """A process that cannot import this project loads the folder with plain diffusers, samples the same
    images, and re-saves a folder that is still portable."""
    folder, resaved = tmp_path / "pipe", tmp_path / "resaved"
    tiny_pipeline.save_pretrained(folder)
    expected = _run(tiny_pipeline, output_type="np").images
    script = DOWNSTREAM.format(purelib=sysconfig.get_paths()["purelib"], folder=str(folder),
                               out=str(tmp_path / "images.npy"), resaved=str(resaved))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf")
    # -S: no site-packages processing, so the editable install of this project is invisible.
    result = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["TextToImageDDPMPipeline", "DDPMScheduler", "TextToImageDDPMPipeline"]
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), expected)
    index = json.loads((resaved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_text2image_ddpm", "TextToImageDDPMPipeline"]
    assert index["scheduler"] == ["scheduling_ddpm", "DDPMScheduler"]
