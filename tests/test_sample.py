"""`python -m finetune.sample`: images, grid and settings from a run's folder; schedulers, seeds, LoRA scale, errors,
the command line (help, snake_case flags) and the progress bar."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import lora, sample
from finetune.cli import run
from finetune.config import LoraConfig, ModelConfig, load_config, save_config
from finetune.data import shapes
from finetune.models import build_components, load_components

from .conftest import TINY_MODEL

STEPS = ["--num-inference-steps", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pixel-space pipeline folder, as a full run writes it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("run") / "base"
    build_components(ModelConfig(**TINY_MODEL), 8, shapes.all_captions()).pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapted(base, tmp_path_factory):
    """LoRA adapters on `base` (random, so they change the images), saved as a LoRA run writes them, with the
    run's config.yaml naming the base; and the adapted pipeline itself."""
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(base)))
    trained = lora.attach(components, LoraConfig(enabled=True))
    generator = torch.Generator().manual_seed(1)
    for p in trained[0].parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=generator) * 0.3
    folder = tmp_path_factory.mktemp("run") / "lora"
    lora.save(folder, components.unet, None)
    save_config(load_config(None, [f"model.pretrained_model_name_or_path={base}", "lora.enabled=true",
                                   "model.train_text_encoder=false"]), folder / "config.yaml")
    return folder, components.pipeline()


def _pixels(folder):
    """Every image a sample run wrote, by file name, as uint8 arrays (the grid left out)."""
    names = json.loads((folder / "settings.json").read_text())["images"]
    return {name: np.asarray(Image.open(folder / name)).astype(int) for name in names}


@pytest.mark.parametrize("scheduler", [None, *sample.SCHEDULERS])
def test_every_scheduler_writes_images_grid_and_settings(base, tmp_path, scheduler):
    out = sample.main([str(base), "a red circle", "a blue square", "--num-images-per-prompt", "2",
                       "--output-dir", str(tmp_path), *STEPS, *(["--scheduler", scheduler] if scheduler else [])])
    settings = json.loads((out / "settings.json").read_text())
    assert settings["images"] == ["00-a-red-circle-00-seed0.png", "00-a-red-circle-01-seed1.png",
                                  "01-a-blue-square-00-seed0.png", "01-a-blue-square-01-seed1.png"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted([*settings["images"], "grid.png"])
    assert all(Image.open(tmp_path / name).size == (8, 8) for name in settings["images"])
    assert Image.open(tmp_path / "grid.png").size == (2 + 2 * 10, 2 + 2 * 10)  # 2 x 2 images of 8 px, 2 px apart
    expected = {None: "DDPMScheduler", "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler",
                "dpm-solver": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}[scheduler]
    assert settings["scheduler"] == expected and settings["num_inference_steps"] == 2
    assert settings["guidance_scale"] == 1.0 and settings["lora_scale"] is None


@pytest.mark.parametrize("prediction_type,zero_snr", [("epsilon", False), ("v_prediction", False),
                                                      ("v_prediction", True), ("sample", False)])
@pytest.mark.parametrize("scheduler", list(sample.SCHEDULERS))
def test_swapped_schedulers_sample_the_trained_process(prediction_type, zero_snr, scheduler):
    """With an oracle model for a one-image data set (it predicts that image's exact epsilon, v or x_0 from x_t
    and t under the trained noise schedule), every swapped scheduler must end exactly on that image: the
    swap keeps the schedule and the prediction type, and the pipeline drives each scheduler correctly."""
    torch.manual_seed(0)
    config = ModelConfig(**TINY_MODEL, prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    components = build_components(config, 8, shapes.all_captions())
    alphas_cumprod = components.scheduler.alphas_cumprod.double()
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.6 - 0.8

    def oracle(sample, timestep, encoder_hidden_states=None, return_dict=True):
        alpha_bar = alphas_cumprod[int(torch.as_tensor(timestep).round())]
        x_t = sample.double()
        epsilon = (x_t - alpha_bar.sqrt() * target) / (1 - alpha_bar).sqrt()
        output = {"epsilon": epsilon, "v_prediction": alpha_bar.sqrt() * epsilon - (1 - alpha_bar).sqrt() * target,
                  "sample": target.expand_as(x_t)}[prediction_type]
        return (output.to(sample.dtype),)

    components.unet.forward = oracle
    pipeline = components.pipeline()
    sample.swap_scheduler(pipeline, scheduler)
    assert type(pipeline.scheduler) is sample.SCHEDULERS[scheduler]
    assert pipeline.scheduler.config.prediction_type == prediction_type
    assert torch.equal(pipeline.scheduler.betas, components.scheduler.betas)
    rows = sample.generate(pipeline, ["a red circle"], num_images_per_prompt=2, num_inference_steps=10)
    expected = ((target[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    for image in rows[0]:
        assert np.abs(np.asarray(image).astype(float) - expected).max() <= 1


def test_same_seed_same_images_other_seed_other_images(base, tmp_path):
    args = [str(base), "a red circle", "a green triangle", "--num-images-per-prompt", "2", *STEPS]
    sample.main(args + ["--output-dir", str(tmp_path / "a")])
    sample.main(args + ["--output-dir", str(tmp_path / "b")])
    sample.main(args + ["--output-dir", str(tmp_path / "c"), "--seed", "1"])
    for name in json.loads((tmp_path / "a" / "settings.json").read_text())["images"] + ["grid.png"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a, c = _pixels(tmp_path / "a"), _pixels(tmp_path / "c")
    assert np.abs(a["00-a-red-circle-00-seed0.png"] - c["00-a-red-circle-00-seed1.png"]).max() > 10
    # Each image has its own seed, whatever the others in the batch: seed 1 is image 1 of --seed 0.
    assert np.abs(a["00-a-red-circle-01-seed1.png"] - c["00-a-red-circle-00-seed1.png"]).max() <= 1


def test_prompts_file(base, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# shapes to draw\n\na red circle\n   a blue square  \n  # indented comment\n\n")
    assert sample.read_prompts(path) == ["a red circle", "a blue square"]
    out = sample.main([str(base), "--prompts-file", str(path), "a green triangle", "--num-images-per-prompt", "1",
                       "--output-dir", str(tmp_path / "out"), *STEPS])  # prompts may come after options
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == ["a green triangle", "a red circle", "a blue square"]
    assert settings["images"][2] == "02-a-blue-square-00-seed0.png"
    assert Image.open(out / "grid.png").size == (10 + 2, 3 * 10 + 2)  # one row per prompt


def test_slug():
    assert sample.slug("A Photo: of a RED circle!") == "a-photo-of-a-red-circle"
    assert sample.slug("...") == "empty"
    assert sample.slug("x" * 100) == "x" * 40


def test_lora_scale_zero_is_the_base_and_one_the_adapters(base, adapted, tmp_path):
    lora_folder, adapted_pipeline = adapted
    args = ["a red circle", "a cat", "--num-images-per-prompt", "2", "--device", "cpu", *STEPS]  # as the reference
    plain = _pixels(sample.main([str(base), *args, "--output-dir", str(tmp_path / "base")]))
    zero = _pixels(sample.main([str(base), *args, "--lora", str(lora_folder), "--lora-scale", "0",
                                "--output-dir", str(tmp_path / "zero")]))
    one = _pixels(sample.main([str(base), *args, "--lora", str(lora_folder / lora.WEIGHT_NAME),
                               "--output-dir", str(tmp_path / "one")]))
    half = _pixels(sample.main([str(lora_folder), *args, "--lora-scale", "0.5",
                                "--output-dir", str(tmp_path / "half")]))
    run = _pixels(sample.main([str(lora_folder), *args]))  # a LoRA output folder: its base from config.yaml

    rows = sample.generate(adapted_pipeline, ["a red circle", "a cat"], 2, 2)
    reference = dict(zip(plain, (np.asarray(image).astype(int) for images in rows for image in images)))
    for name in plain:
        assert np.abs(zero[name] - plain[name]).max() <= 1
        assert np.abs(one[name] - reference[name]).max() <= 1
        assert np.abs(run[name] - reference[name]).max() <= 1
    assert max(np.abs(one[name] - plain[name]).max() for name in plain) > 10  # the adapters do change the images
    assert max(np.abs(half[name] - plain[name]).max() for name in plain) > 3
    assert max(np.abs(half[name] - one[name]).max() for name in plain) > 3
    settings = json.loads((lora_folder / "samples" / "sampled" / "settings.json").read_text())
    assert settings["lora_scale"] == 1.0 and settings["adapters"]
    assert json.loads((tmp_path / "zero" / "settings.json").read_text())["lora_scale"] == 0.0


def test_defaults_guidance_from_the_run_and_output_inside_the_folder(base, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(base, folder)
    save_config(load_config(None, ["validation.guidance_scale=2.5"]), folder / "config.yaml")
    out = sample.main([str(folder), "a red circle", "a blue square", "a cat", "--num-images-per-prompt", "1", *STEPS])
    assert out == folder / "samples" / "sampled"
    assert json.loads((out / "settings.json").read_text())["guidance_scale"] == 2.5
    (out / "notes.txt").write_text("mine")
    sample.main([str(folder), "a red circle", "--num-images-per-prompt", "1", "--guidance-scale", "1", *STEPS])
    # The earlier run's images are gone (the folder holds one run); files it did not write stay.
    assert sorted(p.name for p in out.iterdir()) == ["00-a-red-circle-00-seed0.png", "grid.png", "notes.txt",
                                                     "settings.json"]
    assert json.loads((out / "settings.json").read_text())["guidance_scale"] == 1.0


def test_clear_errors(base, adapted, tmp_path, capsys):
    lora_folder, _ = adapted
    bare_lora = tmp_path / "bare-lora"
    bare_lora.mkdir()
    (bare_lora / lora.WEIGHT_NAME).write_bytes((lora_folder / lora.WEIGHT_NAME).read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing\n\n")
    cases = [
        ([str(empty), "a red circle"], "neither a pipeline"),
        ([str(tmp_path / "missing"), "a red circle"], "is not a folder"),
        ([str(bare_lora), "a red circle"], "no config.yaml naming their base"),
        ([str(base)], "no prompts"),
        ([str(base), "--prompts-file", str(comments)], "no prompts"),
        ([str(base), "a", "--prompts-file", str(tmp_path / "nope.txt")], "--prompts-file"),
        ([str(base), "a red circle", "--lora", str(empty)], "no adapter weights"),
        ([str(base), "a red circle", "--num-inference-steps", "1001"], "between 1 and the 1000 timesteps"),
        ([str(base), "a red circle", "--num-inference-steps", "0"], "between 1 and the 1000 timesteps"),
        ([str(base), "a red circle", "--lora-scale", "0.5"], "no LoRA is loaded"),
        ([str(base), "a red circle", "--num-images-per-prompt", "0"], "--num-images-per-prompt"),
        ([str(base), "a red circle", "--scheduler", "heun"], "invalid choice"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run(sample.main, argv + ["--output-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "out").exists()


def test_every_option_has_help_and_snake_case_flags_work(base, tmp_path, capsys):
    parser, _ = sample.parse_args([str(base), "a red circle"])
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    assert "(default: 50)" in capsys.readouterr().out  # the formatter shows the defaults
    out = sample.main([str(base), "a red circle", "--num_inference_steps", "2", "--num_images_per_prompt", "1",
                       "--output_dir", str(tmp_path), "--quiet"])
    settings = json.loads((out / "settings.json").read_text())
    assert out == tmp_path and settings["num_inference_steps"] == 2 and settings["num_images_per_prompt"] == 1


def test_a_progress_bar_counts_the_images_unless_quiet(base, tmp_path, capsys):
    args = [str(base), "a red circle", "a blue square", "--num-images-per-prompt", "4", *STEPS]
    sample.main(args + ["--output-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert "sampling" in err and "8/8" in err
    sample.main(args + ["--output-dir", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert "sampling" not in err and "it/s" not in err and "%|" not in err, err


def test_a_lora_on_a_pndm_base_samples_and_evaluates(tiny_sd_folder, tmp_path):
    """SD-1.5's own scheduler, PNDM (what samples a LoRA on it downstream), takes no generator in `step`: sampling
    and evaluating a LoRA output on such a base crashed there."""
    from finetune import evaluate

    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    lora.attach(components, LoraConfig(enabled=True))
    folder = tmp_path / "lora"
    lora.save(folder, components.unet, None)
    save_config(load_config(None, [f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
                                   "data.resolution=16", "model.train_text_encoder=false"]), folder / "config.yaml")
    out = sample.main([str(folder), "a red circle", "--num-inference-steps", "3", "--num-images-per-prompt", "2"])
    assert json.loads((out / "settings.json").read_text())["scheduler"] == "PNDMScheduler"
    report = evaluate.main([str(folder), "--colors", "red", "--num-images-per-prompt", "1", "--num-inference-steps",
                            "3", "--no-save"])
    assert report["num_images"] == 3
