"""DreamBooth's prior preservation (prior:): class images drawn by the base once and cached, split over processes;
the base's own prediction as the target with the adapters off; both through the trainer."""

import contextlib
import json
import threading

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from finetune.config import ConfigError, ModelConfig, PriorConfig, load_config
from finetune.encoding import BatchEncoder
from finetune.families import text_conditioning
from finetune.models import load_components
from finetune.objective import on_device
from finetune.prior import BasePrediction, draw_class_images
from finetune.train import build_model, compute_loss

from .test_train import _train

CPU = torch.device("cpu")
SD = ["data.resolution=16", "model.train_text_encoder=false"]  # the tiny SD base: 16 px images, 8 px latents


def _prior(tmp_path, **settings):
    return PriorConfig(**{"mode": "class_images", "class_prompt": "a dog", "num_class_images": 3,
                          "num_inference_steps": 2, "sample_batch_size": 2, "class_data_dir": str(tmp_path),
                          **settings})


def test_class_images_are_drawn_once_and_the_same_over_processes(tiny_sd_folder, tmp_path):
    """3 class images at 16 px in 2 steps; a rerun draws none; two processes (threads here) dealt images 0, 2 and 1
    draw the very same files, each image from its own seed."""
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    folder, drawn = draw_class_images(_prior(tmp_path / "one"), components, 16, 0, 1)
    assert drawn == 3 and sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.{e}" for i in range(3)
                                                                       for e in ("png", "txt")]
    assert (folder / "00001.txt").read_text() == "a dog"
    assert draw_class_images(_prior(tmp_path / "one"), components, 16, 0, 1) == (folder, 0)

    results, bases = {}, [load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
                          for _ in range(2)]  # (loaded here: transformers' loading is not for threads)
    threads = [threading.Thread(target=lambda r=rank: results.setdefault(r, draw_class_images(
        _prior(tmp_path / "two"), bases[r], 16, r, 2))) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [results[r][1] for r in (0, 1)] == [2, 1]
    again = results[0][0]
    assert again.name == folder.name  # the same key: the same base and settings
    for i in range(3):
        assert (again / f"{i:05d}.png").read_bytes() == (folder / f"{i:05d}.png").read_bytes()
    other, _ = draw_class_images(_prior(tmp_path / "one", seed=1), components, 16, 0, 1)
    assert other != folder  # another seed: other images, in a folder of their own


def _lora_setup(tiny_sd_folder, weight):
    config = load_config(None, [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
                                "prior.mode=base_prediction", "prior.class_prompt=a dog",
                                f"prior.prior_loss_weight={weight}"])
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    components, trained = build_model(config, None, accelerator)
    for name, param in components.unet.named_parameters():
        if "lora_B" in name:  # adapters that change something
            param.data.normal_(0, 0.5)
    encoder = BatchEncoder(components.vae, text_conditioning(components), text_trains=False, cache=False)
    ids = components.tokenizer(["sks dog", "sks dog"], padding="max_length", return_tensors="pt").input_ids
    batch = {"key": ["a", "b"], "pixel_values": torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8),
             "input_ids": ids}
    return config, components, encoder, batch


def test_the_base_prediction_target_is_the_base_with_its_adapters_off(tiny_sd_folder):
    config, components, encoder, batch = _lora_setup(tiny_sd_folder, 1.0)
    base = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder))).unet
    for model in (base, components.unet):  # a base with dropout of its own: the target is drawn without it
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Dropout) and "lora_" not in name:
                module.p = 0.5
    prior = BasePrediction(config.prior, components.tokenizers, components.unet,
                           lambda: torch.autocast("cpu", enabled=False))
    noisy, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    conditioning = encoder.conditioning({**batch, "input_ids": prior.ids["input_ids"].expand(2, -1)}, CPU)
    assert components.unet.training
    target = prior.target(noisy, timesteps, conditioning)
    assert components.unet.training  # (back in training mode for the trained forward)
    components.unet.eval()
    with torch.no_grad():
        assert torch.equal(target, base(noisy, timesteps, **conditioning).sample)
        adapted = components.unet(noisy, timesteps, **conditioning).sample
    assert not torch.allclose(target, adapted)  # the adapters are back on afterwards, and change the output


def test_a_prior_loss_weight_of_0_gives_the_instance_loss(tiny_sd_folder):
    """prior_loss_weight 0: the loss and the adapters' gradients are those without the prior (the instance half of
    a forward over both halves against a forward over the instance images alone: equal to float32 rounding, since
    the kernels may sum a batch of 4 in another order than one of 2)."""
    results = []
    for use_prior in (True, False):
        config, components, encoder, batch = _lora_setup(tiny_sd_folder, 0.0)
        if use_prior:
            encoder.prior = BasePrediction(config.prior, components.tokenizers, components.unet,
                                           lambda: torch.autocast("cpu", enabled=False))
        torch.manual_seed(1)
        loss, groups = compute_loss(batch, components.unet, encoder, on_device(components.scheduler, CPU), CPU,
                                    config.train)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in components.unet.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, groups))
    (with_prior, grads, groups), (alone, alone_grads, _) = results
    torch.testing.assert_close(with_prior, alone, rtol=1e-6, atol=0)
    assert grads.keys() == alone_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], alone_grads[name], rtol=1e-5, atol=1e-8)
    assert groups[1] == groups[3] == 2 and groups[2] > 0  # the class half was measured, weighing nothing


@pytest.mark.parametrize("overrides, message", [
    (["prior.mode=class_images"], "prior.class_prompt: needed"),
    (["prior.mode=base_prediction", "prior.class_prompt=a dog", "model.pretrained_model_name_or_path=x"],
     "needs lora.enabled: true"),
    (["prior.mode=class_images", "prior.class_prompt=a dog"], "fine-tune a base"),
    (["prior.mode=class_images", "prior.class_prompt=a dog", "prior.num_class_images=0"],
     "prior.num_class_images, num_inference_steps"),
])
def test_a_bad_prior_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dreambooth_runs_with_class_images_and_with_base_predictions(tiny_sd_folder, tmp_path):
    """class_images: the base's 4 class images join the built-in data as a regularisation dataset as large as the
    data (64 samples an epoch), drawn by the first run, found by the second; base_prediction: no images, each
    step's loss has its class half. Both log loss_instance and loss_regularisation."""
    common = [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
              "prior.class_prompt=a shape", "train.max_train_steps=3", "validation.compare_with_base=false"]
    images = [*common, "prior.mode=class_images", "prior.num_class_images=4", "prior.num_inference_steps=2",
              f"prior.class_data_dir={tmp_path / 'class'}", "prior.prior_loss_weight=0.5"]
    first = _train(tmp_path, *images, f"train.output_dir={tmp_path / 'a'}")
    assert "2 datasets, 128 samples an epoch" in first.stdout
    assert "class_images: imagefolder" in first.stdout and "regularisation, loss weight 0.5" in first.stdout
    assert "(4 drawn by this process)" in first.stderr
    second = _train(tmp_path, *images, f"train.output_dir={tmp_path / 'b'}")
    assert "(0 drawn by this process)" in second.stderr
    assert any("loss_regularisation" in line for line in _metrics(tmp_path / "a"))

    _train(tmp_path, *common, "prior.mode=base_prediction", f"train.output_dir={tmp_path / 'c'}")
    logged = [line for line in _metrics(tmp_path / "c") if "loss" in line]
    assert len(logged) == 3 and all("loss_regularisation" in line and "loss_instance" in line for line in logged)


@pytest.mark.parametrize("heading", ["### Several datasets in one run", "### DreamBooth: prior preservation",
                                     "### Textual inversion and pivotal tuning"])
def test_the_readmes_examples_load(tmp_path, heading):
    """The YAML the README shows for several datasets, prior preservation and textual inversion is a valid config."""
    from .test_train import ROOT

    text = (ROOT / "README.md").read_text()
    block = text[text.index(heading):].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "run.yaml").write_text(block)
    config = load_config(tmp_path / "run.yaml", ["model.pretrained_model_name_or_path=base"])
    assert config.data.sources or config.prior.mode == "class_images" or config.textual_inversion.num_vectors == 4


@pytest.mark.slow
def test_two_processes_share_the_drawing_and_a_prior_run_resumes_exactly(tiny_sd_folder, tmp_path):
    """Two processes (gloo) of a full fine-tune with class images: they draw the groups of 4 and 1 of the 5 images
    (the same key in both: diffusers' scheduler configs list a set, in another order per process), wait for each
    other's files (no collective), and train together. A base_prediction LoRA run resumed at step 3 ends bit for bit
    where the uninterrupted one does (its class half's noise comes from the checkpointed RNG too)."""
    from .test_train import _two_process_launcher

    result = _train(tmp_path, *SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "train.max_train_steps=2",
                    "data.num_samples=2000",  # (shards for two processes)
                    "prior.mode=class_images", "prior.class_prompt=a shape", "prior.num_class_images=5",
                    "prior.num_inference_steps=2", f"prior.class_data_dir={tmp_path / 'class'}",
                    "validation.compare_with_base=false", f"train.output_dir={tmp_path / 'two'}",
                    launcher=_two_process_launcher(), env={"ACCELERATE_USE_CPU": "1"})
    assert "(4 drawn by this process)" in result.stderr and "(1 drawn by this process)" in result.stderr
    assert "weights identical on all 2 processes" in result.stderr
    assert len(list(next((tmp_path / "class").iterdir()).glob("*.png"))) == 5

    common = [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
              "prior.mode=base_prediction", "prior.class_prompt=a shape", "train.max_train_steps=6",
              "train.checkpointing_steps=3", "validation.compare_with_base=false"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(tmp_path, *common, f"train.output_dir={full}")
    resumed.mkdir()
    (resumed / "checkpoint-3").symlink_to(full / "checkpoint-3")
    _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    a = load_file(full / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_class_images_key_is_the_bases_weights_and_sampler_not_its_adapters(tiny_sd_folder, tmp_path):
    """The key hashes the base's weights without the adapters a LoRA run put on them (nor their names), and the
    sampler that draws (a LoRA run samples with the base's own, PNDM here)."""
    from finetune.prior import class_folder

    _, adapted, _, _ = _lora_setup(tiny_sd_folder, 1.0)
    plain = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    assert class_folder(_prior(tmp_path), adapted, 16) != class_folder(_prior(tmp_path), plain, 16)
    plain.sampler = adapted.sampler
    assert class_folder(_prior(tmp_path), adapted, 16) == class_folder(_prior(tmp_path), plain, 16)
    plain.unet.conv_in.weight.data += 1e-3
    assert class_folder(_prior(tmp_path), adapted, 16) != class_folder(_prior(tmp_path), plain, 16)


def test_the_data_with_class_images_keeps_every_datasets_settings(tmp_path):
    """A kohya-style folder (captions in .caption files) or a mix whose entries inherit the section's caption
    settings become entries that spell those settings out; the class images train without caption dropout. Checked
    when the config loads, before anything is drawn."""
    from finetune.prior import with_class_images

    base = ["model.pretrained_model_name_or_path=base", "prior.mode=class_images", "prior.class_prompt=a dog"]
    single = load_config(None, [*base, "data.source=imagefolder", "data.path=dogs", "data.caption_extension=.caption",
                                "data.caption_dropout=0"])
    data = with_class_images(single.data, tmp_path, single.prior, 40)
    instance, images = data.sources
    assert instance["caption_extension"] == ".caption" and instance["caption_dropout"] == 0
    assert images["caption_dropout"] == 0 and images["samples_per_epoch"] == 40 and images["is_regularisation"]
    mixed = load_config(None, [*base, "data.caption_dropout=0", "data.sources=[{source: imagefolder, path: a, "
                                                                "repeats: 2}]"])
    first, _ = with_class_images(mixed.data, tmp_path, mixed.prior, None).sources
    assert first["caption_dropout"] == 0 and first["repeats"] == 2


def test_a_dry_run_draws_no_class_image(tiny_sd_folder, tmp_path):
    from types import SimpleNamespace

    from finetune.prior import add_class_images

    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    config = load_config(None, [f"model.pretrained_model_name_or_path={tiny_sd_folder}", "prior.mode=class_images",
                                "prior.class_prompt=a dog", f"prior.class_data_dir={tmp_path}"])
    accelerator = SimpleNamespace(local_process_index=0, num_processes=1, autocast=contextlib.nullcontext)
    source = SimpleNamespace(num_samples=64)
    assert add_class_images(config.prior, config.data, components, source, accelerator, 0, dry_run=True) == \
        (source, config.data)
    assert list(tmp_path.iterdir()) == []


def test_a_bf16_lora_run_draws_its_class_images_under_its_autocast(tiny_sd_folder, tmp_path):
    """Under mixed precision the adapters skip their input casts (the run's autocast does them): the class images
    are drawn under that autocast too."""
    config = load_config(None, [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
                                "train.mixed_precision=bf16"])
    from types import SimpleNamespace

    accelerator = SimpleNamespace(device=CPU, mixed_precision="bf16")  # (accelerate's state is one per process)
    components, _ = build_model(config, None, accelerator)
    folder, drawn = draw_class_images(_prior(tmp_path), components, 16, 0, 1,
                                      lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert drawn == 3 and len(list(folder.glob("*.png"))) == 3


def test_both_modes_on_an_sdxl_base(tiny_sdxl_folder, tmp_path):
    """SDXL: the class images are drawn by the stock SDXL pipeline; base_prediction joins the two halves' pooled
    embeddings and time ids (added_cond_kwargs) and every adapter gets a gradient."""
    from .test_sdxl import _ids

    config = load_config(None, [f"model.pretrained_model_name_or_path={tiny_sdxl_folder}", "data.resolution=16",
                                "model.train_text_encoder=false", "lora.enabled=true", "prior.mode=base_prediction",
                                "prior.class_prompt=a dog"])
    accelerator = Accelerator(cpu=True)
    components, trained = build_model(config, None, accelerator)
    folder, drawn = draw_class_images(_prior(tmp_path, num_class_images=2), components, 16, 0, 1)
    assert drawn == 2 and len(list(folder.glob("*.png"))) == 2
    encoder = BatchEncoder(components.vae, text_conditioning(components), text_trains=False, cache=False)
    encoder.prior = BasePrediction(config.prior, components.tokenizers, components.unet,
                                   lambda: torch.autocast("cpu", enabled=False))
    ids = _ids(components, ["sks dog", "sks dog"])
    batch = {"pixel_values": torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), "input_ids": ids[:, :77],
             "input_ids_2": ids[:, 77:], "original_size": torch.tensor([[16, 16]] * 2),
             "crop_top_left": torch.zeros(2, 2, dtype=torch.long)}
    loss, groups = compute_loss(batch, components.unet, encoder, on_device(components.scheduler, CPU), CPU,
                                config.train)
    loss.backward()
    assert groups[1] == groups[3] == 2
    assert all(p.grad is not None for p in components.unet.parameters() if p.requires_grad)


@pytest.mark.slow
def test_the_dreambooth_recipe_runs_on_a_tiny_base(tiny_sd_folder, tmp_path):
    """configs/dreambooth-lora.yaml as shipped (bf16, class images, default caption, flips), with only the base,
    the folder, the counts and the sizes swapped for tiny ones."""
    from PIL import Image

    from .test_train import ROOT

    photos = tmp_path / "my_dog"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 20), (40 * i, 90, 200)).save(photos / f"{i}.jpg")
    out = tmp_path / "run"
    result = _train(tmp_path, "--config", str(ROOT / "configs" / "dreambooth-lora.yaml"),
                    f"model.pretrained_model_name_or_path={tiny_sd_folder}", f"data.path={photos}",
                    "data.resolution=16", "data.num_samples=null", "train.train_batch_size=2",
                    "prior.num_class_images=4", "prior.num_inference_steps=2",
                    f"prior.class_data_dir={tmp_path / 'class'}", "train.max_train_steps=2",
                    "validation.num_inference_steps=2", f"train.output_dir={out}")
    assert "precision bf16" in result.stdout and "2 datasets, 6 samples an epoch" in result.stdout
    assert "(4 drawn by this process)" in result.stderr
    assert (out / "pytorch_lora_weights.safetensors").is_file()
