"""SDXL-shaped bases: two text encoders, the pooled embedding and the size-and-crop time ids, trained as the stock
SDXL pipeline conditions, and outputs that stock diffusers loads. The base is built from SDXL base 1.0's own configs
(tests/conftest.py, `build_tiny_sdxl_pipeline`), shrunk in size only."""

import functools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, HeunDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from finetune import lora
from finetune.cli import UserError
from finetune.config import DataConfig, ModelConfig
from finetune.data import ImageTextStream, build_source
from finetune.data.transforms import crop_square
from finetune.encoding import BatchEncoder
from finetune.export import exported_checkpoint
from finetune.families import TwoEncodersXL, text_conditioning, time_ids
from finetune.models import Components, frozen_dtype, load_components

from . import launch
from .test_hub import _grid_tiles
from .test_train import ROOT, _train

XL = ["data.resolution=16", "model.train_text_encoder=false", "validation.guidance_scale=2.0",
      "validation.num_inference_steps=3"]


@pytest.fixture(scope="module")
def xl(tiny_sdxl_folder) -> Components:
    return load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl_folder)))


def _ids(components: Components, captions: list[str]) -> torch.Tensor:
    family = text_conditioning(components)
    tokenized = [components.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt").input_ids,
                 components.tokenizer_2(captions, padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt").input_ids]
    return family.ids({"input_ids": tokenized[0], "input_ids_2": tokenized[1]})


def test_text_conditioning_is_what_the_sdxl_pipeline_encodes(xl):
    """The trainer's embeddings of a caption are the stock pipeline's `encode_prompt` (penultimate layers of both
    encoders concatenated, the second's pooled projection), and an empty caption is its unconditional input: zeros."""
    family = text_conditioning(xl)
    assert isinstance(family, TwoEncodersXL)
    with torch.no_grad():
        hidden, pooled = family.embed(_ids(xl, ["a red circle", ""]), torch.device("cpu"))
        pipe = xl.pipeline()
        embeds, negative, pooled_ref, negative_pooled = pipe.encode_prompt("a red circle", device="cpu",
                                                                           do_classifier_free_guidance=True)
    assert hidden.shape == (2, 77, 16 + 24) and pooled.shape == (2, 16)
    torch.testing.assert_close(hidden[:1], embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled[:1], pooled_ref, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(hidden[0]) > 0
    assert torch.equal(hidden[1:], negative) and torch.equal(pooled[1:], negative_pooled)  # zeros


def test_the_text_cache_gives_the_same_conditioning(xl):
    batch = {"input_ids": None, "pixel_values": torch.zeros(3, 3, 16, 16, dtype=torch.uint8),
             "original_size": torch.tensor([[20, 40], [16, 16], [20, 40]]),
             "crop_top_left": torch.tensor([[0, 8], [0, 0], [0, 8]])}
    ids = _ids(xl, ["a cat", "", "a cat"])
    batch["input_ids"], batch["input_ids_2"] = ids[:, :77], ids[:, 77:]
    cached = BatchEncoder(xl.vae, text_conditioning(xl), text_trains=False, cache=True)
    plain = BatchEncoder(xl.vae, text_conditioning(xl), text_trains=False, cache=False)
    first, again, reference = (encoder.conditioning(batch, torch.device("cpu")) for encoder in (cached, cached, plain))
    assert len(cached.text_cache) == 2
    for result in (first, again):
        torch.testing.assert_close(result["encoder_hidden_states"], reference["encoder_hidden_states"])
        for name in ("text_embeds", "time_ids"):
            torch.testing.assert_close(result["added_cond_kwargs"][name], reference["added_cond_kwargs"][name])
    assert reference["added_cond_kwargs"]["time_ids"].tolist() == [[20, 40, 0, 8, 16, 16], [16, 16, 0, 0, 16, 16],
                                                                   [20, 40, 0, 8, 16, 16]]


def test_the_crop_offset_is_where_the_trained_pixels_are():
    """`crop_square` returns the crop's (top, left) in the resized image; for a flipped crop, the offset in the
    flipped image: cropping the resized (and flipped) image there gives exactly the training pixels."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))  # 50 wide, 30 high
    resized = image.resize((27, 16), Image.Resampling.BICUBIC)
    seen_flipped = seen_plain = False
    for seed in range(12):
        pixels, (top, left) = crop_square(image, 16, center_crop=False, random_flip=True, rng=random.Random(seed))
        plain = np.asarray(resized.crop((left, top, left + 16, top + 16)))
        flipped = np.asarray(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((left, top, left + 16, top + 16)))
        array = pixels.permute(1, 2, 0).numpy()
        seen_plain |= np.array_equal(array, plain)
        seen_flipped |= np.array_equal(array, flipped)
        assert np.array_equal(array, plain) or np.array_equal(array, flipped), seed
    assert seen_plain and seen_flipped
    assert crop_square(image, 16, True, False, random.Random(0))[1] == (0, 5)


def test_the_stream_gives_each_image_its_size_and_crop(xl, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 20), "red").save(folder / "wide.png")
    Image.new("RGB", (24, 36), "blue").save(folder / "tall.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "wide.png", "text": "a red thing"}\n'
                                           '{"file_name": "tall.png", "text": "a blue thing"}\n')
    data = DataConfig(source="imagefolder", path=str(folder), resolution=16, center_crop=True)
    stream = ImageTextStream(build_source(data, 0), data, xl.tokenizers, seed=0)
    examples = {e["key"]: e for e in stream}
    assert len(examples) == 2
    batch = torch.utils.data.default_collate(sorted(examples.values(), key=lambda e: e["key"]))
    assert time_ids(batch, torch.device("cpu"), torch.float32).tolist() == [
        [36, 24, 4, 0, 16, 16],  # tall: 16 x 24 after resizing, cropped 4 px from the top
        [20, 40, 0, 8, 16, 16],  # wide: 32 x 16, cropped 8 px from the left
    ]
    assert batch["input_ids_2"].shape == batch["input_ids"].shape == (2, 77)
    assert not torch.equal(batch["input_ids"], batch["input_ids_2"])  # "!" pads the second


def test_the_vae_runs_in_float32_where_float16_would_overflow(xl):
    """SDXL's VAE config asks for float32 (`force_upcast`): under fp16 it stays float32, under bf16 (float32's
    range) it follows the training precision; `model.vae_upcast` decides either way."""
    assert xl.vae.config.force_upcast
    auto, on, off = (ModelConfig(pretrained_model_name_or_path="x", vae_upcast=v) for v in (None, True, False))
    assert frozen_dtype(xl, xl.vae, auto, "fp16") == torch.float32
    assert frozen_dtype(xl, xl.vae, auto, "bf16") == torch.bfloat16
    assert frozen_dtype(xl, xl.vae, on, "bf16") == torch.float32
    assert frozen_dtype(xl, xl.vae, off, "fp16") == torch.float16
    assert frozen_dtype(xl, xl.unet, on, "fp16") == torch.float16


def test_an_sd_vae_follows_the_training_precision(tiny_sd_folder):
    """diffusers gives every VAE force_upcast: true unless its config says otherwise, SD-1.5's included: an SD-1.x
    VAE still trains in fp16 as before; only SDXL's upcasts by itself."""
    sd = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    assert sd.vae.config.force_upcast
    auto = ModelConfig(pretrained_model_name_or_path="x")
    assert frozen_dtype(sd, sd.vae, auto, "fp16") == torch.float16


def test_every_trainable_weight_gets_a_gradient(tiny_sdxl_folder):
    """SDXL reads CLIP-L at its penultimate layer: its last layer and final norm are frozen (with their adapters),
    or DDP over several processes would wait forever for their gradients. After one backward pass every weight that
    trains has a gradient, for LoRA on both encoders and for full fine-tunes of them."""
    from types import SimpleNamespace

    from finetune.config import load_config
    from finetune.objective import on_device
    from finetune.train import build_model, compute_loss

    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no")
    base = [f"model.pretrained_model_name_or_path={tiny_sdxl_folder}", "data.resolution=16"]
    for overrides in (["model.train_text_encoder=false", "lora.enabled=true", "lora.train_text_encoder=true",
                       "lora.text_encoder_target_modules=[q_proj, k_proj, v_proj, out_proj, fc1, fc2]"],
                      ["model.train_text_encoder=true"]):
        config = load_config(None, base + overrides)
        components, trained = build_model(config, None, accelerator)
        ids = _ids(components, ["a red circle", "a cat"])
        batch = {"pixel_values": torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), "input_ids": ids[:, :77],
                 "input_ids_2": ids[:, 77:], "original_size": torch.tensor([[16, 16]] * 2),
                 "crop_top_left": torch.zeros(2, 2, dtype=torch.long)}
        encoder = BatchEncoder(components.vae, text_conditioning(components), True, False)
        compute_loss(batch, components.unet, encoder, on_device(components.scheduler, accelerator.device),
                     accelerator.device, config.train)[0].backward()
        missing = [name for model in trained for name, p in model.named_parameters()
                   if p.requires_grad and p.grad is None]
        assert not missing, (overrides, missing[:3])
        assert any(not p.requires_grad for p in components.text_encoder.parameters())


def test_a_vae_in_place_of_the_bases(tiny_sdxl_folder, tmp_path):
    torch.manual_seed(1)
    other = AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_sdxl_folder / "vae"))
    other.save_pretrained(tmp_path / "fixed-vae")
    config = ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl_folder),
                         pretrained_vae_model_name_or_path=str(tmp_path / "fixed-vae"))
    loaded = load_components(config).vae.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in other.state_dict().items())
    with pytest.raises(UserError, match=r"model.pretrained_vae_model_name_or_path=.*no AutoencoderKL"):
        load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl_folder),
                                    pretrained_vae_model_name_or_path=str(tmp_path / "nothing-here")))


def test_bases_of_another_shape_are_refused(tiny_sdxl_folder, tiny_sd_folder, tmp_path):
    # An SDXL UNet in a pipeline with one text encoder (model_index.json without text_encoder_2).
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_sd_folder, mixed)
    shutil.rmtree(mixed / "unet")
    shutil.copytree(tiny_sdxl_folder / "unet", mixed / "unet")
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*SDXL-shaped"):
        load_components(ModelConfig(pretrained_model_name_or_path=str(mixed)))


DOWNSTREAM = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
args = json.loads(sys.argv[1])
pipe = DiffusionPipeline.from_pretrained(args["pipeline"], use_safetensors=True)
pipe.set_progress_bar_config(disable=True)
images = []
for weight_name in [None, *args["lora_files"]]:
    pipe.unload_lora_weights()
    if weight_name:
        pipe.load_lora_weights(args["lora"], weight_name=weight_name)
    out = pipe(args["prompts"], num_images_per_prompt=args["n"], num_inference_steps=args["steps"],
               guidance_scale=args["guidance"], generator=torch.Generator("cpu").manual_seed(args["seed"]),
               output_type="pil")
    images.append(np.stack([np.asarray(image) for image in out.images]))
np.save(args["save"], np.stack(images))
assert not any(name.split(".")[0] in ("finetune", "pipelines") for name in sys.modules)
print(type(pipe).__name__, type(pipe.scheduler).__name__)
"""


def _downstream(tmp_path, out, pipeline, lora_files=()):
    """The run's validation images drawn by stock diffusers in a process that never imports this project: without
    adapters, then with each of the LoRA files in `out` named."""
    validation = yaml.safe_load((out / "config.yaml").read_text())["validation"]
    args = {"pipeline": str(pipeline), "lora": str(out), "lora_files": list(lora_files),
            "prompts": validation["prompts"], "n": validation["num_images_per_prompt"],
            "steps": validation["num_inference_steps"], "guidance": validation["guidance_scale"],
            "seed": validation["seed"], "save": str(tmp_path / "downstream.npy")}
    result = subprocess.run([sys.executable, "-c", DOWNSTREAM, json.dumps(args)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split(), np.load(tmp_path / "downstream.npy")


@pytest.mark.slow
def test_a_lora_on_sdxl_resumes_exactly_and_loads_in_the_stock_sdxl_pipeline(tiny_sdxl_folder, tmp_path):
    """Adapters on the UNet and both text encoders train on SDXL's conditioning, from the text cache; a run resumed
    from its step-2 checkpoint ends with the same tensors; stock diffusers, in a process without this project, loads
    the file onto the base and draws exactly the trainer's final grid, and the same images from the kohya file; the
    checkpoint exports to the same layout."""
    common = [*XL, f"model.pretrained_model_name_or_path={tiny_sdxl_folder}", "lora.enabled=true", "lora.alpha=8",
              "lora.train_text_encoder=true", "lora.text_encoder_rank=2", "data.cache=true",
              "train.max_train_steps=4", "train.checkpointing_steps=2", "train.learning_rate=1e-2"]
    out, resumed = tmp_path / "run", tmp_path / "resumed"
    result = _train(tmp_path, *common, f"train.output_dir={out}")
    assert "SDXL" in result.stdout and "and the text encoders (rank 2)" in result.stdout
    resumed.mkdir()
    (resumed / "checkpoint-2").symlink_to(out / "checkpoint-2")
    _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    weights, again = load_file(out / lora.WEIGHT_NAME), load_file(resumed / lora.WEIGHT_NAME)
    assert {key.split(".")[0] for key in weights} == {"unet", "text_encoder", "text_encoder_2"}
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert not (out / "model_index.json").exists()

    (kind, scheduler), images = _downstream(tmp_path, out, tiny_sdxl_folder, [lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME])
    assert (kind, scheduler) == ("StableDiffusionXLPipeline", "EulerDiscreteScheduler")
    np.testing.assert_array_equal(images[1], _grid_tiles(out, 4, columns=1))
    assert not np.array_equal(images[0], images[1])
    assert np.abs(images[2].astype(int) - images[1]).max() <= 1  # the kohya file: the same images, to rounding

    exported, _ = exported_checkpoint(out / "checkpoint-2")
    assert load_file(exported / lora.WEIGHT_NAME).keys() == weights.keys()


@pytest.mark.slow
def test_a_full_finetune_of_sdxl_is_a_stock_sdxl_pipeline(tiny_sdxl_folder, tmp_path):
    """Every UNet weight trains, the frozen encoders and VAE come out unchanged, and the folder is a stock
    StableDiffusionXLPipeline (the base's scheduler class) that draws the trainer's final grid."""
    out = tmp_path / "run"
    _train(tmp_path, *XL, f"model.pretrained_model_name_or_path={tiny_sdxl_folder}", "train.max_train_steps=2",
           "train.use_ema=false", f"train.output_dir={out}")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    for part, name, changed in (("unet", "diffusion_pytorch_model", True), ("vae", "diffusion_pytorch_model", False),
                                ("text_encoder", "model", False), ("text_encoder_2", "model", False)):
        base, tuned = (load_file(f / part / f"{name}.safetensors") for f in (tiny_sdxl_folder, out))
        assert base.keys() == tuned.keys(), part
        assert any(not torch.equal(base[k], tuned[k]) for k in base) == changed, part
    (kind, _), images = _downstream(tmp_path, out, out)
    assert kind == "StableDiffusionXLPipeline"
    np.testing.assert_array_equal(images[0], _grid_tiles(out, 2, columns=1))
    assert isinstance(StableDiffusionXLPipeline.from_pretrained(out).vae, AutoencoderKL)


@pytest.mark.slow
def test_the_sdxl_laion_recipe_runs_on_a_tiny_base(tiny_sdxl_folder, tiny_shards, tmp_path):
    """configs/sdxl-lora-laion.yaml as shipped (bf16, gradient checkpointing, aspect-ratio buckets, random crops and
    flips, the VAE override, resampled shards, workers, filters), with only the base, the VAE, the data and the sizes
    swapped for tiny ones."""
    recipe = ROOT / "configs" / "sdxl-lora-laion.yaml"
    out = tmp_path / "run"
    result = _train(tmp_path, "--config", str(recipe), f"model.pretrained_model_name_or_path={tiny_sdxl_folder}",
                    f"model.pretrained_vae_model_name_or_path={tiny_sdxl_folder / 'vae'}",
                    f"data.path={tiny_shards}/00000.tar", "data.num_samples=32", "data.resolution=16",
                    "data.num_workers=2", "data.shuffle_buffer=8", "data.bucket_step=8", "data.filters.min_width=null",
                    "data.filters.min_height=null", "data.filters.min_aesthetic=null", "lora.rank=2", "lora.alpha=2",
                    "train.max_train_steps=2", "train.train_batch_size=2", "validation.num_inference_steps=2",
                    f"train.output_dir={out}")
    assert "precision bf16" in result.stdout and "SDXL" in result.stdout
    assert "in 3 aspect-ratio buckets" in result.stdout
    assert (out / lora.WEIGHT_NAME).is_file() and (out / "samples" / "step-2.png").is_file()


def test_sdxl_at_another_square_size_is_refused(tiny_sdxl_folder):
    """Square crops at a size the base was not made for (16 px here, as 1024 px for SDXL base) are refused with
    both ways out; buckets take any size."""
    from types import SimpleNamespace

    from finetune.config import load_config
    from finetune.train import build_model

    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no")
    base = [f"model.pretrained_model_name_or_path={tiny_sdxl_folder}", "model.train_text_encoder=false"]
    with pytest.raises(UserError, match=r"data.resolution: 32 px .* made for 16 px; set data.resolution: 16, or "
                                        r"data.buckets: true"):
        build_model(load_config(None, [*base, "data.resolution=32"]), None, accelerator)
    build_model(load_config(None, [*base, "data.resolution=32", "data.buckets=true", "data.bucket_step=8"]), None,
                accelerator)


def test_the_validation_loss_of_sdxl_is_conditioned_as_the_stock_pipeline_conditions(tiny_sdxl_folder):
    """The validation loss (heldout.py: evaluate's and the trainer's) on an SDXL pipeline, by hand one pair at a time
    with the stock pipeline's own `encode_prompt` and `_get_add_time_ids` (each pair's original size and crop, one of
    them changed): the objective at fixed timesteps with the pair's fixed noise. The size-and-crop ids reach the
    UNet: another crop, another loss."""
    from finetune import heldout, metrics
    from finetune.data.shapes import DEFAULT_COLORS
    from pipelines import DDPMScheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    pairs = heldout.held_out_pairs(heldout.HeldOutShapes(3, DEFAULT_COLORS), DataConfig(resolution=16), 3)[0]
    assert all(p["original_size"].tolist() != [16, 16] for p in pairs)  # the rendering's size, not the crop's
    pairs[1] = {**pairs[1], "original_size": torch.tensor([40, 24]), "crop_top_left": torch.tensor([4, 0])}
    timesteps = [10, 900]
    report = heldout.validation_loss(pipe, pairs, timesteps, seed=3, batch_size=2)

    alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    expected = []
    for t in timesteps:
        errors = []
        for i, pair in enumerate(pairs):
            with torch.no_grad():
                x0 = pipe.vae.encode(pair["pixels"][None]).latent_dist.mean * pipe.vae.config.scaling_factor
                eps = metrics.fixed_noise(x0.shape[1:], 3, i)[None]
                x_t = alphas_cumprod[t].sqrt() * x0 + (1 - alphas_cumprod[t]).sqrt() * eps
                embeds, _, pooled, _ = pipe.encode_prompt(pair["caption"], device="cpu",
                                                          do_classifier_free_guidance=False)
                time_ids = pipe._get_add_time_ids(tuple(pair["original_size"].tolist()),
                                                  tuple(pair["crop_top_left"].tolist()), (16, 16), embeds.dtype,
                                                  text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
                pred = pipe.unet(x_t, torch.tensor([t]), encoder_hidden_states=embeds,
                                 added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            errors.append(float(((pred - eps) ** 2).mean()))  # (the tiny base's prediction type: epsilon)
        expected.append(np.mean(errors))
    assert report["prediction_type"] == "epsilon"
    assert list(report["per_timestep"].values()) == pytest.approx(expected, rel=1e-5)
    cropped = [{**pairs[0], "crop_top_left": torch.tensor([8, 8])}]
    assert heldout.validation_loss(pipe, cropped, timesteps)["mean"] != \
        heldout.validation_loss(pipe, pairs[:1], timesteps)["mean"]


def test_the_reverse_process_of_sdxl_is_the_stock_pipelines_own_run(tiny_sdxl_folder):
    """visualize's reverse process on an SDXL pipeline (Euler): its image is the stock pipeline's for the seed; x_T is
    the pipeline's own noise in DDPM's scaling (Euler starts from sigma_max times it); the prediction at the last
    step is the final x_0 (Euler's last step lands on it); the scheduler is itself again afterwards."""
    from diffusers.utils.torch_utils import randn_tensor

    from finetune import visualize

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    pipe.set_progress_bar_config(disable=True)
    process = visualize.reverse_frames(pipe, "a red circle", 4, 2.0, seed=3)
    assert not {"step", "scale_model_input"} & set(vars(pipe.scheduler))
    image = pipe("a red circle", num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(3),
                 output_type="pil").images[0]
    assert np.array_equal(np.asarray(process.image), np.asarray(image))
    assert process.steps == [0, 1, 2, 3, 4] and process.timesteps[-1] == -1
    assert process.timesteps[:4] == [int(t) for t in pipe.scheduler.timesteps]
    noise = randn_tensor(process.noisy[0].sample[None].shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(process.noisy[0].sample[None], noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(process.predicted[3].sample, process.noisy[4].sample, rtol=1e-5, atol=1e-5)
    assert process.predicted[4].sample is None and process.noisy[4].label == "x_0\nfinal image"

    scheduler = pipe.scheduler  # a step of the instance's own is put back as it was
    own = functools.partial(type(scheduler).step, scheduler)
    scheduler.step = own
    assert np.array_equal(np.asarray(visualize.reverse_frames(pipe, "a red circle", 4, 2.0, seed=3).image),
                          np.asarray(image))
    assert vars(scheduler)["step"] is own and "scale_model_input" not in vars(scheduler)
    pipe.scheduler = HeunDiscreteScheduler.from_config(scheduler.config)  # two model calls a step: refused first
    with pytest.raises(UserError, match="HeunDiscreteScheduler calls the model 2 times a step"):
        visualize.reverse_frames(pipe, "a red circle", 4, 2.0)


def test_the_forward_process_of_sdxl_is_trainings_noising(xl, tiny_sdxl_folder):
    """visualize's forward process on an SDXL pipeline noises with the schedule training noises with (the
    trainer's scheduler), not with the pipeline's Euler sampler."""
    from finetune import visualize

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    noising = visualize.forward_scheduler(pipe)
    assert type(noising) is type(xl.scheduler) and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert torch.equal(noising.alphas_cumprod, xl.scheduler.alphas_cumprod)
    frames = visualize.forward_frames(noising, torch.zeros(3, 16, 16), [500], seed=0, vae=pipe.vae)
    x0, x500, noise = frames[1].sample, frames[2].sample, frames[3].sample
    alpha_bar = xl.scheduler.alphas_cumprod[500]
    torch.testing.assert_close(x500, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)


@pytest.mark.slow
def test_sample_evaluate_and_visualize_take_an_sdxl_run(tiny_sdxl_folder, tmp_path):
    """An SDXL LoRA run with validation.loss_samples logs the held-out loss and draws the process strips at its end;
    `python -m finetune.evaluate` measures adherence and the same validation loss on the run's output (the base with
    the adapters); `sample` draws from it; `visualize` draws the forward and reverse processes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = _train(tmp_path, *XL, f"model.pretrained_model_name_or_path={tiny_sdxl_folder}", "lora.enabled=true",
                    "train.max_train_steps=1", "validation.loss_samples=4", f"train.output_dir={out}")
    assert "step 1: validation loss " in result.stderr and "not measured" not in result.stderr, result.stderr[-2000:]
    assert "not drawn" not in result.stderr, result.stderr[-2000:]
    assert {p.name for p in (out / "samples" / "process").iterdir()} == {"forward.png", "reverse-step-1.png"}
    logged = {}
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events)).Reload()
        if "validation_loss" in accumulator.Tags()["scalars"]:
            logged.update({e.step: e.value for e in accumulator.Scalars("validation_loss")})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    sampled = launch.run([sys.executable, "-m", "finetune.sample", str(out), "a red circle",
                          "--num-inference-steps", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert sampled.returncode == 0 and (out / "samples" / "sampled" / "grid.png").is_file(), sampled.stderr[-2000:]
    evaluated = launch.run([sys.executable, "-m", "finetune.evaluate", str(out), "--colors", "red",
                            "--num-images-per-prompt", "1", "--num-inference-steps", "2", "--max-samples", "4",
                            "--json", str(tmp_path / "report.json")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_images"] == 3 and 0 <= report["metrics"]["color_accuracy"] <= 1
    assert report["metrics"]["validation_loss"] == pytest.approx(logged[1], rel=1e-5)
    drawn = launch.run([sys.executable, "-m", "finetune.visualize", str(out), "--num-inference-steps", "3",
                        "--output-dir", str(tmp_path / "process")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert {p.name for p in (tmp_path / "process").iterdir()} == {"forward.png", "forward.gif", "reverse.png",
                                                                   "reverse.gif"}
