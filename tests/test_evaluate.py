"""The evaluate command: the adherence judge on known drawings and its report on a (random) pipeline; the
validation loss against a hand computation, on pixel, latent and LoRA models; held-out data; CLIP score and FID
through the command with a tiny local CLIP; evaluation.json and its merging; the command line and its progress
bars."""

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from finetune import evaluate, heldout, lora, metrics
from finetune.cli import run
from finetune.config import DataConfig, LoraConfig, ModelConfig, load_config, save_config
from finetune.data import build_source, shapes
from finetune.models import load_components
from pipelines import DDPMScheduler
from tests.conftest import TINY_MODEL
from tests.test_metrics import save_tiny_clip


def _draw(shape, rgb, size=32, box=(6, 8, 24, 26)):
    image = Image.new("RGB", (size * 4, size * 4), (245, 243, 240))
    draw, big = ImageDraw.Draw(image), [4 * v for v in box]
    if shape == "circle":
        draw.ellipse(big, fill=rgb)
    elif shape == "square":
        draw.rectangle(big, fill=rgb)
    else:
        draw.polygon([((big[0] + big[2]) / 2, big[1]), (big[2], big[3]), (big[0], big[3])], fill=rgb)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def test_judge_known_drawings():
    colors = {"red": (220, 30, 30), "orange": (240, 130, 20), "yellow": (235, 225, 30), "green": (30, 180, 40),
              "blue": (30, 60, 220), "purple": (150, 40, 220)}
    for name, rgb in colors.items():
        for shape in ("circle", "square", "triangle"):
            assert evaluate.judge(_draw(shape, rgb)) == (name, shape)


def test_grey_watermark_is_not_foreground():
    image = _draw("circle", (30, 60, 220)).copy()
    image[1:4, 2:30] = 128
    assert evaluate.judge(image) == ("blue", "circle")


def test_report_on_a_pipeline(tiny_pipeline, tmp_path):
    report = evaluate.evaluate_pipeline(tiny_pipeline, colors=("red", "blue"), num_images_per_prompt=2,
                                        num_inference_steps=2)
    assert report["num_images"] == 12 and len(report["per_prompt"]) == 6
    assert 0 <= report["color_accuracy"] <= 1 and 0 <= report["shape_accuracy"] <= 1
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    out = evaluate.main([str(tmp_path / "pipe"), "--num-images-per-prompt", "1", "--num-inference-steps", "2",
                         "--colors", "red", "--json", str(tmp_path / "report.json"), "--max-samples", "4"])
    assert json.loads((tmp_path / "report.json").read_text())["num_images"] == out["num_images"] == 3


def test_guidance_defaults_to_the_runs(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    assert evaluate.run_guidance_scale(str(tmp_path)) == 1.0
    save_config(load_config(None, ["validation.guidance_scale=2.5"]), tmp_path / "config.yaml")
    report = evaluate.main([str(tmp_path), "--num-images-per-prompt", "1", "--num-inference-steps", "1",
                            "--colors", "red", "--max-samples", "4"])
    assert report["guidance_scale"] == 2.5


# ---- held-out data -----------------------------------------------------------------------------


def _pairs(count, resolution=8):
    pairs, skipped = heldout.held_out_pairs(heldout.HeldOutShapes(count, shapes.DEFAULT_COLORS),
                                             DataConfig(resolution=resolution), count)
    assert len(pairs) == count and not skipped
    return pairs


def test_held_out_shapes_are_new_renderings_of_the_training_concepts(tiny_shards):
    """The default held-out pairs share no key and no image with the training set (seed 0), but every colour and
    shape they show is one training shows: new renderings, not new concepts."""
    source = build_source(DataConfig(source="webdataset", path=shapes.shard_pattern(tiny_shards, 64)), 0)
    training = list(source.samples(random.Random(0), 0, 1, Counter()))
    held_out = list(heldout.HeldOutShapes(64, shapes.DEFAULT_COLORS).samples(random.Random(0), 0, 1, Counter()))
    assert len(training) == len(held_out) == 64
    assert not {s.key for s in training} & {s.key for s in held_out}
    training_pixels = {np.asarray(Image.open(io.BytesIO(s.image))).tobytes() for s in training}
    assert not training_pixels & {np.asarray(Image.open(io.BytesIO(s.image))).tobytes() for s in held_out}
    for field in ("color", "shape"):
        assert {s.metadata[field] for s in held_out} == {s.metadata[field] for s in training}


def test_held_out_pairs_are_the_same_every_time():
    first, second = _pairs(6), _pairs(6)
    assert [p["key"] for p in first] == [p["key"] for p in second]
    assert all(torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"] for a, b in zip(first, second))
    assert first[0]["pixels"].shape == (3, 8, 8) and -1 <= first[0]["pixels"].min() <= first[0]["pixels"].max() <= 1


# ---- validation loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_validation_loss_is_the_objective_at_fixed_timesteps(tiny_pipeline, prediction_type):
    """By hand, one pair at a time: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with the pair's fixed
    noise, the target eps or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, the squared error averaged."""
    pipe = tiny_pipeline
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    pairs, timesteps = _pairs(5), [0, 500, 999]
    report = heldout.validation_loss(pipe, pairs, timesteps, seed=3, batch_size=2)  # batches of 2, 2 and 1

    expected = []
    for t in timesteps:
        alpha_bar = pipe.scheduler.alphas_cumprod[t]
        errors = []
        for i, pair in enumerate(pairs):
            x0, eps = pair["pixels"][None], metrics.fixed_noise((3, 8, 8), 3, i)[None]
            x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
            with torch.no_grad():
                pred = pipe.unet(x_t, torch.tensor([t]), encoder_hidden_states=pipe.encode_prompt([pair["caption"]],
                                                                                                 "cpu")).sample
            target = eps if prediction_type == "epsilon" else alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
            errors.append(float(((pred - target) ** 2).mean()))
        expected.append(np.mean(errors))
    assert list(report["per_timestep"]) == timesteps
    assert list(report["per_timestep"].values()) == pytest.approx(expected, rel=1e-5)
    assert report["mean"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert report["prediction_type"] == prediction_type and report["num_samples"] == 5


def test_validation_loss_is_deterministic_and_tells_models_apart(tiny_pipeline):
    from finetune.models import build_components

    pairs, timesteps = _pairs(6), metrics.loss_timesteps(1000, 4)
    first = heldout.validation_loss(tiny_pipeline, pairs, timesteps)
    torch.randn(10)  # the global RNG plays no part
    assert heldout.validation_loss(tiny_pipeline, pairs, timesteps) == first
    by_three = heldout.validation_loss(tiny_pipeline, pairs, timesteps, batch_size=3)["mean"]
    assert by_three == pytest.approx(first["mean"], rel=1e-5)  # the batch size does not change the noise
    torch.manual_seed(1)
    other = build_components(ModelConfig(**TINY_MODEL), resolution=8, caption_texts=shapes.all_captions()).pipeline()
    assert abs(heldout.validation_loss(other, pairs, timesteps)["mean"] - first["mean"]) > 1e-3
    assert heldout.validation_loss(tiny_pipeline, pairs, timesteps, seed=1)["mean"] != first["mean"]


def test_validation_loss_of_a_latent_pipeline(tiny_sd_folder):
    pipe = evaluate.load_result(str(tiny_sd_folder))
    pairs = _pairs(3, resolution=16)  # 16 px images, 8 px latents
    x0 = heldout.clean_samples(pipe.vae, torch.stack([p["pixels"] for p in pairs]))
    with torch.no_grad():
        mean = pipe.vae.encode(torch.stack([p["pixels"] for p in pairs])).latent_dist.mean
    assert x0.shape == (3, 4, 8, 8) and torch.equal(x0, mean * pipe.vae.config.scaling_factor)
    report = heldout.validation_loss(pipe, pairs, [10, 900])
    assert np.isfinite(report["mean"]) and heldout.validation_loss(pipe, pairs, [10, 900]) == report


def _lora_run(base, folder, resolution):
    """A LoRA run's output folder (random adapters, as if trained) with its config.yaml."""
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(base)))
    adapted = lora.attach(components, LoraConfig(enabled=True, rank=2))
    generator = torch.Generator().manual_seed(1)
    for model in adapted:
        for p in model.parameters():
            if p.requires_grad:
                p.data = torch.randn(p.shape, generator=generator) * 0.3
    lora.save(folder, components.unet, None)
    save_config(load_config(None, [f"model.pretrained_model_name_or_path={base}", "model.train_text_encoder=false",
                                   "lora.enabled=true", "lora.rank=2", f"data.resolution={resolution}"]),
                folder / "config.yaml")
    return folder


def test_validation_loss_of_a_lora_output_on_a_latent_base(tiny_sd_folder, tmp_path):
    folder = _lora_run(tiny_sd_folder, tmp_path / "lora", resolution=16)
    report = evaluate.main([str(folder), "--metrics", "loss", "--max-samples", "3", "--num-loss-timesteps", "2"])
    assert set(report["metrics"]) == {"validation_loss", "validation_loss_t250", "validation_loss_t750"}
    pairs = _pairs(3, resolution=16)
    adapted = heldout.validation_loss(evaluate.load_result(str(folder)), pairs, [250, 750])
    assert report["metrics"]["validation_loss"] == pytest.approx(adapted["mean"], rel=1e-6)
    base = heldout.validation_loss(evaluate.load_result(str(tiny_sd_folder)), pairs, [250, 750])
    assert abs(base["mean"] - adapted["mean"]) > 1e-4


def test_held_out_data_of_another_source_must_be_named(tiny_pipeline, tiny_shards, tmp_path):
    """A run on its own data gets no loss from that data: the default skips it, --metrics loss is refused with
    what to do; --data names held-out shards."""
    folder = tmp_path / "run"
    tiny_pipeline.save_pretrained(folder)
    pattern = shapes.shard_pattern(tiny_shards, 64)
    save_config(load_config(None, ["data.source=webdataset", f"data.path={pattern}", "data.resolution=8"]),
                folder / "config.yaml")
    assert evaluate.main([str(folder), "--no-save"])["metrics"] == {}  # not the built-in set: no adherence either
    with pytest.raises(SystemExit):
        evaluate.main([str(folder), "--metrics", "loss"])
    with pytest.raises(SystemExit):
        evaluate.main([str(folder), "--data", "train.seed=1"])

    held_out = shapes.write_shards(tmp_path / "val", 8, seed=5)
    report = evaluate.main([str(folder), "--data", f"data.path={held_out[0]}", "--max-samples", "4",
                            "--num-loss-timesteps", "2"])
    assert report["loss"]["num_samples"] == 4 and report["settings"]["loss_data"] == f"webdataset: {held_out[0]}"


def test_loss_refusals_name_the_problem(capsys, tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path), "--metrics", "loss", "--loss-timesteps", "5", "1000"])
    assert "each must be in [0, 1000)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path), "--data", "train.seed=1"])
    assert "only data-section overrides" in capsys.readouterr().err


# ---- CLIP score and FID ------------------------------------------------------------------------


def test_a_missing_feature_model_is_named_before_anything_loads(capsys, tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "no-such-run"), "--metrics", "loss", "clip"])
    err = capsys.readouterr().err
    assert "--clip-model PATH" in err and "hf download openai/clip-vit-large-patch14" in err
    assert "model.safetensors" in err and "never downloads" in err
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "no-such-run"), "--metrics", "fid"])
    err = capsys.readouterr().err
    assert "--fid-model PATH" in err and "--clip-model" in err


def test_clip_score_and_fid_through_the_command(tiny_pipeline, tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    folder = tmp_path / "run"
    tiny_pipeline.save_pretrained(folder)
    args = [str(folder), "--metrics", "clip", "fid", "--clip-model", str(clip), "--max-samples", "6",
            "--num-generated", "4", "--num-inference-steps", "2", "--batch-size", "3"]
    report = evaluate.main(args)
    assert 0 <= report["metrics"]["clip_score"] <= 100 and len(report["clip"]["per_image"]) == 4
    assert report["metrics"]["fid"] >= 0 and np.isfinite(report["metrics"]["fid"])
    assert report["settings"]["clip_model"] == report["settings"]["fid_model"] == str(clip)
    assert report["settings"]["fid_features"] == "CLIPModel image embeddings"
    assert report["settings"]["fid_num_images"] == report["settings"]["fid_num_real"] == 4
    assert evaluate.main(args + ["--batch-size", "4"])["metrics"] == pytest.approx(report["metrics"], rel=1e-4)


def test_generated_images_do_not_depend_on_the_batch_size(tiny_pipeline):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    one = evaluate.generate_images(tiny_pipeline, prompts, 2, 1.0, seed=0, batch_size=1)
    three = evaluate.generate_images(tiny_pipeline, prompts, 2, 1.0, seed=0, batch_size=3)
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(one, three))
    assert one[0].dtype == np.uint8 and one[0].shape == (8, 8, 3)


# ---- evaluation.json ---------------------------------------------------------------------------


def test_evaluation_json_merges_and_replaces_by_metric(tmp_path):
    (tmp_path / "evaluation.json").write_text(json.dumps({"color_accuracy": 1.0, "per_prompt": []}))  # an old report
    evaluate.write_evaluation(tmp_path, {"adherence": ({"color_accuracy": 0.5, "shape_accuracy": 1,
                                                        "color_accuracy_red": 0.25}, {"adherence_seed": 0})})
    evaluate.write_evaluation(tmp_path, {"loss": ({"validation_loss": 0.2, "validation_loss_t50": 0.3},
                                                  {"loss_timesteps": [50]})})
    data = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(data) == {"metrics", "settings"}
    assert data["metrics"] == {"color_accuracy": 0.5, "shape_accuracy": 1.0, "color_accuracy_red": 0.25,
                               "validation_loss": 0.2, "validation_loss_t50": 0.3}
    assert all(isinstance(v, float) for v in data["metrics"].values())
    assert data["settings"] == {"adherence_seed": 0, "loss_timesteps": [50]}

    evaluate.write_evaluation(tmp_path, {"loss": ({"validation_loss": 0.1, "validation_loss_t500": 0.1},
                                                  {"loss_timesteps": [500]})})
    data = json.loads((tmp_path / "evaluation.json").read_text())
    assert "validation_loss_t50" not in data["metrics"] and data["metrics"]["validation_loss_t500"] == 0.1
    assert data["metrics"]["color_accuracy"] == 0.5 and data["settings"]["loss_timesteps"] == [500]


def test_the_command_writes_and_merges_evaluation_json(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    common = ["--num-images-per-prompt", "1", "--num-inference-steps", "1", "--colors", "red", "--max-samples", "3"]
    evaluate.main([str(tmp_path), "--metrics", "adherence", "--no-save", *common])
    assert not (tmp_path / "evaluation.json").exists()
    # scripts/demo.sh names evaluation.json with --json: it still gets the metrics file's shape
    evaluate.main([str(tmp_path), "--metrics", "adherence", "--json", str(tmp_path / "evaluation.json"), *common])
    evaluate.main([str(tmp_path), "--metrics", "loss", "--num-loss-timesteps", "2", *common])
    data = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(data) == {"metrics", "settings"}
    assert {"color_accuracy", "shape_accuracy", "color_accuracy_red", "validation_loss", "validation_loss_t250",
            "validation_loss_t750"} == set(data["metrics"])
    assert data["settings"]["adherence_colors"] == ["red"] and data["settings"]["loss_num_samples"] == 3
    assert data["settings"]["loss_data"].startswith("builtin held-out renderings (seed 1")


def test_held_out_data_of_a_resampled_run_is_read_once(tmp_path):
    """A run that resampled its shards still evaluates each held-out pair once (the SD/LAION recipe)."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "configs" / "sd15-lora-laion.yaml"
    save_config(load_config(recipe), tmp_path / "config.yaml")
    run, held_out = heldout.held_out_data(str(tmp_path), ["data.path=val/{000..001}.tar"], 512)
    assert run.resampled and not held_out.resampled and held_out.num_samples is None


# ---- the command line ----------------------------------------------------------------------------


def test_every_option_has_help_and_mistakes_are_one_line(tiny_pipeline, tmp_path, capsys):
    parser, _ = evaluate.parse_args([str(tmp_path)])
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    tiny_pipeline.save_pretrained(tmp_path / "run")
    for argv, message in [
        ([str(tmp_path / "missing")], "is not a folder"),
        ([str(tmp_path)], "neither a pipeline (no model_index.json)"),
        ([str(tmp_path / "run"), "--metrics", "loss", "--max_samples", "0"], "--max-samples, --num-generated"),
        ([str(tmp_path / "run"), "--metrics", "speed"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run(evaluate.main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_progress_bars_count_the_work_unless_quiet(tiny_pipeline, tmp_path, capsys):
    tiny_pipeline.save_pretrained(tmp_path)
    args = [str(tmp_path), "--colors", "red", "--num-images-per-prompt", "1", "--num-inference-steps", "2",
            "--max-samples", "8", "--batch-size", "3", "--num-loss-timesteps", "2", "--no-save"]
    evaluate.main(args)
    err = capsys.readouterr().err
    assert "adherence: 3 images" in err and "2/2" in err  # one batch: its denoising steps
    assert "validation loss" in err and "8/8" in err  # the held-out pairs
    evaluate.main(args + ["--quiet"])
    err = capsys.readouterr().err
    assert "adherence" not in err and "it/s" not in err and "%|" not in err, err
