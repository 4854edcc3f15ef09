"""Pictures of the diffusion process: the forward and reverse strips, their GIFs, pixel and latent models, the CLI."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import visualize
from finetune.cli import run
from finetune.config import ModelConfig
from finetune.data import shapes
from finetune.data.transforms import decode_rgb, to_tensor
from finetune.models import build_components
from pipelines import DDPMScheduler, TextToImageDDPMPipeline

from .conftest import TINY_MODEL


@pytest.fixture(scope="module")
def pixel_pipeline():
    """A tiny pixel-space pipeline drawing 16 px images."""
    torch.manual_seed(0)
    pipe = build_components(ModelConfig(**TINY_MODEL), 16, shapes.all_captions()).pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def latent_pipeline(tiny_sd_folder):
    """A tiny Stable-Diffusion-shaped pipeline (VAE, 8 px latents, 16 px images) loaded as this project's pipeline,
    sampling with DDPM, whose steps predict x_0 (the base's own PNDM predicts none)."""
    pipe = TextToImageDDPMPipeline.from_pretrained(tiny_sd_folder)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(size=16):
    """Sample 0 of the built-in set, as training sees it at `size` px: (3, size, size) in [-1, 1]."""
    png, _, _ = shapes.render_sample(0, 0)
    return to_tensor(decode_rgb(png), size, center_crop=True, random_flip=False, rng=random.Random(0))


def _display(pixels):
    """What a [-1, 1] tensor (3, H, W) should look like: 8-bit RGB."""
    return ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def _cell(strip, row, column):
    return np.asarray(strip.crop(strip.info["cell_boxes"][row][column]))


def _enlarged(image, factor):
    return np.asarray(image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST))


def test_default_timesteps_and_spacing():
    assert visualize.default_timesteps(1000) == [200, 400, 600, 800, 999]
    assert visualize.default_timesteps(10, 20) == list(range(1, 10))
    assert visualize.spaced(50, 6) == [0, 10, 20, 30, 40, 50]
    assert visualize.spaced(2, 6) == [0, 1, 2]


def test_forward_frames_go_from_the_image_to_pure_noise(pixel_pipeline):
    scheduler, image = pixel_pipeline.scheduler, _image()
    frames = visualize.forward_frames(scheduler, image, [10, 500, 999], seed=0)
    assert [f.label for f in frames] == ["x_0", "t=10", "t=500", "t=999", "pure noise"]
    assert torch.equal(frames[0].sample, image)
    assert np.array_equal(np.asarray(frames[0].image), _display(image))
    noise = frames[-1].sample
    assert abs(noise.mean()) < 0.15 and abs(noise.std() - 1) < 0.15
    # Every x_t is sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with the same eps (Ho et al. eq. 4).
    for frame, t in zip(frames[1:4], [10, 500, 999]):
        alpha_bar = scheduler.alphas_cumprod[t]
        assert torch.allclose(frame.sample, alpha_bar.sqrt() * image + (1 - alpha_bar).sqrt() * noise, atol=1e-5)
    assert (frames[1].sample - image).std() < 0.2  # t=10: still the image
    x_999 = frames[3].sample
    assert abs(x_999.std() - 1) < 0.15 and torch.corrcoef(torch.stack([x_999.flatten(), noise.flatten()]))[0, 1] > 0.99
    again = visualize.forward_frames(scheduler, image, [500], seed=0)
    other = visualize.forward_frames(scheduler, image, [500], seed=1)
    assert torch.equal(again[1].sample, frames[2].sample) and not torch.allclose(other[1].sample, frames[2].sample)
    with pytest.raises(ValueError, match="between 0 and 999"):
        visualize.forward_frames(scheduler, image, [1000])


def test_forward_strip_and_gif(pixel_pipeline, tmp_path):
    image = _image()
    strip, frames = visualize.forward_strip(pixel_pipeline.scheduler, image, [250, 999], seed=0, cell_size=96)
    boxes = strip.info["cell_boxes"]
    assert len(boxes) == 1 and len(boxes[0]) == 4  # x_0, t=250, t=999, pure noise
    assert np.array_equal(_cell(strip, 0, 0), _enlarged(Image.fromarray(_display(image)), 6))  # 16 px x 6 = 96
    assert _cell(strip, 0, 3).astype(float).std() > 60  # noise: pixels all over [0, 255]
    assert strip.width >= 4 * 96 and strip.height > 96
    assert len(frames) == 4 and len({f.size for f in frames}) == 1
    path = visualize.save_gif(frames, tmp_path / "forward.gif")
    with Image.open(path) as gif:
        assert gif.is_animated and gif.n_frames == 4 and gif.info["loop"] == 0
    _, more = visualize.forward_strip(pixel_pipeline.scheduler, image, [250, 999], gif_timesteps=[1, 2, 3, 4, 5, 6])
    assert len(more) == 8


def test_reverse_strip_ends_on_the_pipelines_own_image(pixel_pipeline, tmp_path):
    settings = {"num_inference_steps": 4, "guidance_scale": 2.0}
    reference = pixel_pipeline("a red circle", generator=torch.Generator().manual_seed(3), **settings).images[0]
    strip, frames = visualize.reverse_strip(pixel_pipeline, "a red circle", seed=3, num_shown=3, cell_size=64,
                                            **settings)
    boxes = strip.info["cell_boxes"]
    assert [len(row) for row in boxes] == [3, 3]  # x_t from x_T to x_0 over predicted x_0
    assert strip.info["title"].startswith('Reverse process for "a red circle": 4 DDPMScheduler steps')
    assert "VAE" not in strip.info["title"]
    assert np.array_equal(_cell(strip, 0, 2), _enlarged(reference, 4))
    assert (_cell(strip, 1, 2) == visualize.EMPTY_CELL).all()  # no prediction from the final image
    assert not np.array_equal(_cell(strip, 0, 0), _cell(strip, 0, 2))
    assert len(frames) == 5  # every x_t: x_T, after each of the 4 steps
    path = visualize.save_gif(frames, tmp_path / "reverse.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 5
    _, fewer = visualize.reverse_strip(pixel_pipeline, "a red circle", seed=3, num_gif_frames=3, **settings)
    assert len(fewer) == 3


def test_reverse_frames_follow_the_trajectory(pixel_pipeline):
    process = visualize.reverse_frames(pixel_pipeline, "a blue square", num_inference_steps=4, seed=0)
    assert process.steps == [0, 1, 2, 3, 4] and process.timesteps == [750, 500, 250, 0, -1]
    assert [f.label.split("\n")[0] for f in process.noisy] == ["x_T (pure noise)", "x_t", "x_t", "x_t", "x_0"]
    assert abs(process.noisy[0].sample.std() - 1) < 0.15  # x_T ~ N(0, I)
    assert process.predicted[-1].sample is None and process.predicted[0].sample.shape == (3, 16, 16)
    assert np.array_equal(np.asarray(process.noisy[-1].image), np.asarray(process.image))
    # DDPM's last step (t=0) returns its predicted x_0: the last prediction is the final image.
    assert torch.allclose(process.predicted[-2].sample, process.noisy[-1].sample)


def test_latent_pipeline(latent_pipeline):
    image = _image(16)
    strip, frames = visualize.forward_strip(latent_pipeline.scheduler, image, [500, 999], vae=latent_pipeline.vae,
                                            cell_size=32)
    labels = [f.label for f in visualize.forward_frames(latent_pipeline.scheduler, image, [500, 999],
                                                        vae=latent_pipeline.vae)]
    assert labels == ["image", "x_0 (latent)", "t=500", "t=999", "pure noise"]
    assert len(strip.info["cell_boxes"][0]) == 5 and len(frames) == 5
    assert "VAE latents, decoded for display" in strip.info["title"]
    assert np.array_equal(_cell(strip, 0, 0), _enlarged(Image.fromarray(_display(image)), 2))
    latent = visualize.forward_frames(latent_pipeline.scheduler, image, [500], vae=latent_pipeline.vae)[1]
    assert latent.sample.shape == (4, 8, 8) and latent.image.size == (16, 16)

    reference = latent_pipeline("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    strip, frames = visualize.reverse_strip(latent_pipeline, "a cat", num_inference_steps=3, num_shown=4,
                                            cell_size=32)
    assert np.array_equal(_cell(strip, 0, 3), _enlarged(reference, 2))
    assert len(frames) == 4
    process = visualize.reverse_frames(latent_pipeline, "a cat", num_inference_steps=3)
    assert process.noisy[0].sample.shape == (4, 8, 8) and process.noisy[0].image.size == (16, 16)
    assert process.predicted[0].image.size == (16, 16)


def test_cli_writes_strips_and_gifs(pixel_pipeline, tmp_path, capsys):
    folder = tmp_path / "run"
    pixel_pipeline.save_pretrained(folder)
    out = visualize.main([str(folder), "--num-inference-steps", "3", "--cell-size", "32", "--timesteps", "100", "900"])
    assert out == folder / "samples" / "process"
    assert sorted(p.name for p in out.iterdir()) == ["forward.gif", "forward.png", "reverse.gif", "reverse.png"]
    with Image.open(out / "forward.gif") as gif:
        assert gif.n_frames == 20 + 2  # x_0, 20 timesteps, pure noise
    with Image.open(out / "reverse.gif") as gif:
        assert gif.n_frames == 3 + 1
    forward = Image.open(out / "forward.png")
    assert forward.size[0] >= 4 * 32
    printed = capsys.readouterr().out
    assert repr(shapes.render_sample(0, 0)[1]) in printed and "'a red circle'" in printed  # the defaults

    picture = tmp_path / "wide.png"
    Image.new("RGB", (40, 20), (200, 30, 30)).save(picture)
    visualize.main([str(folder), "--image", str(picture), "--prompt", "a blue square", "--num-inference-steps", "2",
                    "--output-dir", str(tmp_path / "mine")])
    assert "wide.png" in capsys.readouterr().out

    for argv, message in [
        ([str(tmp_path)], "neither a pipeline"),
        ([str(folder), "--timesteps", "1000"], "between 0 and 999"),
        ([str(folder), "--num-inference-steps", "0"], "between 1 and 1000"),
        ([str(folder), "--image", str(tmp_path / "missing.png")], "--image"),
        ([str(folder), "--num_shown", "1"], "--num-shown must be >= 2"),  # snake_case spelling too
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run(visualize.main, argv + ["--output-dir", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_every_option_has_help(tmp_path):
    parser, _ = visualize.parse_args([str(tmp_path)])
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
