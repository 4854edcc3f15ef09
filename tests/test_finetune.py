"""Fine-tuning pretrained bases through the trainer: LoRA and full, pixel and latent space, the text cache."""

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lycoris_utils import LycorisLayer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.config import ModelConfig, load_config
from finetune.encoding import BatchEncoder
from finetune.export import exported
from finetune.families import OneEncoder
from finetune.models import load_components
from finetune.train import build_model
from finetune.validation import sample_grid
from pipelines import TextToImageDDPMPipeline

from .test_train import ROOT, _train

SD = ["data.resolution=16", "model.train_text_encoder=false"]  # 16 px images -> 8 px latents for the tiny SD base
GUIDED = ["validation.guidance_scale=2.0"]


def _grid(folder, step):
    return np.asarray(Image.open(folder / "samples" / f"step-{step}.png"))


def _regrid(pipe, folder):
    """The run's validation grid drawn again by `pipe`, with the run's prompts, seed, steps and guidance."""
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(sample_grid(pipe, load_config(folder / "config.yaml").validation))


@pytest.fixture
def pixel_base(tiny_pipeline, tmp_path):
    folder = tmp_path / "base"
    tiny_pipeline.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_lora_on_a_stable_diffusion_base_reloads_in_a_stock_pipeline(tiny_sd_folder, tmp_path):
    """Latent space: the VAE encodes, adapters on the UNet and the text encoder (alpha != rank) train, and a stock
    StableDiffusionPipeline with `load_lora_weights` draws exactly the trainer's final grid."""
    out = tmp_path / "run"
    result = _train(tmp_path, *SD, *GUIDED, f"model.pretrained_model_name_or_path={tiny_sd_folder}",
                    "lora.enabled=true", "lora.alpha=8", "lora.train_text_encoder=true", "lora.text_encoder_rank=2",
                    "train.max_train_steps=4", f"train.output_dir={out}")
    assert "LoRA rank 4 on attn2.to_q" in result.stdout and "latent space" in result.stdout
    assert "%; UNet " in result.stdout
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "model_index.json").exists()

    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    before = _regrid(stock, out)
    stock.load_lora_weights(out)
    after = _regrid(stock, out)
    assert np.array_equal(after, _grid(out, 4))
    assert not np.array_equal(before, after)


@pytest.mark.slow
def test_lora_on_our_pixel_base_reloads_in_our_pipeline(pixel_base, tmp_path):
    out = tmp_path / "run"
    _train(tmp_path, *GUIDED, f"model.pretrained_model_name_or_path={pixel_base}", "model.train_text_encoder=false",
           "lora.enabled=true", "lora.rank=2", "lora.alpha=6", "lora.dropout=0.1", "train.max_train_steps=4",
           "train.learning_rate=1e-2", f"train.output_dir={out}")
    pipe = TextToImageDDPMPipeline.from_pretrained(pixel_base)
    before = _regrid(pipe, out)
    pipe.load_lora_weights(out)
    assert np.array_equal(_regrid(pipe, out), _grid(out, 4))
    assert not np.array_equal(before, _grid(out, 4))


@pytest.mark.slow
def test_full_finetune_of_a_stable_diffusion_base(tiny_sd_folder, tmp_path):
    """Every UNet weight trains; the frozen VAE and text encoder come out unchanged; the result is a pipeline, which,
    loaded afresh, draws the run's final grid exactly."""
    out = tmp_path / "run"
    _train(tmp_path, *SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "train.max_train_steps=3",
           "train.use_ema=false", f"train.output_dir={out}")
    for part, changed in (("unet", True), ("vae", False)):
        name = "diffusion_pytorch_model.safetensors"
        base, tuned = load_file(tiny_sd_folder / part / name), load_file(out / part / name)
        assert base.keys() == tuned.keys()
        assert any(not torch.equal(base[k], tuned[k]) for k in base) == changed, part
        if part == "unet":
            assert all(not torch.equal(base[k], tuned[k]) for k in base if k.endswith("conv_in.weight"))
    base_text, tuned_text = (load_file(f / "text_encoder" / "model.safetensors") for f in (tiny_sd_folder, out))
    assert all(torch.equal(base_text[k], tuned_text[k]) for k in base_text)
    pipe = TextToImageDDPMPipeline.from_pretrained(out)
    assert pipe.vae is not None and pipe.unet.config.in_channels == 4
    assert np.array_equal(_regrid(pipe, out), _grid(out, 3))  # the exported files draw the run's final grid


@pytest.mark.slow
@pytest.mark.parametrize("flip", ["false", "true"])
def test_cache_trains_the_same_as_encoding_every_step(tiny_sd_folder, tmp_path, flip):
    """Two epochs of 4 batches: with data.cache the second epoch reuses the first's encodings, and the run ends
    where the uncached one does (VAE latents are still drawn from the cached distribution at every step), kept in
    memory or on disk (data.cache_dir); with random flips too, each orientation cached on its own."""
    common = [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
              "data.num_samples=20", "data.shuffle_buffer=4", "train.max_train_steps=8", "train.use_ema=false",
              f"data.random_flip={flip}"]
    runs = {"true": ["data.cache=true"], "false": ["data.cache=false"],
            "disk": ["data.cache=true", f"data.cache_dir={tmp_path / 'encodings'}"]}
    for name, settings in runs.items():
        _train(tmp_path, *common, *settings, f"train.output_dir={tmp_path / name}")
    assert any((tmp_path / "encodings").glob("vae-*/*/*.safetensors"))
    uncached = load_file(tmp_path / "false" / "pytorch_lora_weights.safetensors")
    # The cache encodes other batches than the uncached run does (each image's distribution once), so latents may
    # differ in their last bits; 8 steps carry that into the weights (1.4e-6 to 1.9e-6 measured). AdamW moves a
    # weight by at most about the learning rate a step: in these 8 warm-up steps (1e-3 x k/100, k = 0..7) 2.8e-4 in
    # all. The bound, 8e-6, is 3% of that and 4x the measured rounding.
    for name in ("true", "disk"):
        cached = load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
        for key in uncached:
            torch.testing.assert_close(cached[key], uncached[key], rtol=0, atol=1e-3 * 8 * 1e-3, msg=f"{name}: {key}")


class _CountingEncoder(torch.nn.Module):
    """Stands in for the frozen text encoder and counts the rows it encodes."""

    def __init__(self):
        super().__init__()
        self.rows, self.device = 0, torch.device("cpu")
        self.table = torch.nn.Embedding(10, 3)

    def forward(self, ids, return_dict=False):
        self.rows += ids.shape[0]
        return (self.table(ids),)


def test_cache_encodes_each_caption_once():
    text = _CountingEncoder()
    encoder = BatchEncoder(None, OneEncoder(text), text_trains=False, cache=True)
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4], [1, 2]]),
             "pixel_values": torch.zeros(3, 3, 8, 8, dtype=torch.uint8)}
    first = encoder.conditioning(batch, torch.device("cpu"))["encoder_hidden_states"]
    second = encoder.conditioning({**batch, "input_ids": torch.tensor([[3, 4], [5, 6]])},
                                  torch.device("cpu"))["encoder_hidden_states"]
    assert text.rows == 2 + 1  # [1, 2] and [3, 4], then only [5, 6]
    torch.testing.assert_close(first, text.table(batch["input_ids"]), rtol=0, atol=0)
    torch.testing.assert_close(second[0], first[1], rtol=0, atol=0)
    uncached = BatchEncoder(None, OneEncoder(text), text_trains=False, cache=False)
    uncached.conditioning(batch, torch.device("cpu"))
    assert text.rows == 3 + 3


@pytest.mark.slow
def test_prediction_type_and_zero_terminal_snr_switch_a_base(pixel_base, tmp_path):
    out = tmp_path / "run"
    _train(tmp_path, f"model.pretrained_model_name_or_path={pixel_base}", "model.prediction_type=v_prediction",
           "model.rescale_betas_zero_snr=true", "train.snr_gamma=5", "train.max_train_steps=2",
           f"train.output_dir={out}")
    pipe = TextToImageDDPMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.alphas_cumprod[-1] == 0

    result = _train(tmp_path, f"model.pretrained_model_name_or_path={pixel_base}", "model.rescale_betas_zero_snr=true",
                    "train.max_train_steps=2", f"train.output_dir={tmp_path / 'refused'}", check=False)
    assert result.returncode != 0 and "model.prediction_type: v_prediction" in result.stderr


def test_frozen_parts_take_the_training_precision_and_adapters_stay_float32(tiny_sd_folder):
    """Under bf16 the frozen VAE, text encoder and the UNet's base weights move to bf16 (half the memory, as in
    diffusers' examples), while the adapters that train stay float32 (`cast_training_params`)."""
    config = load_config(None, [f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
                                "model.train_text_encoder=false", "data.resolution=16"])
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16")
    components, trained = build_model(config, None, accelerator)
    assert trained == [components.unet]
    assert {p.dtype for p in components.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in components.text_encoder.parameters()} == {torch.bfloat16}
    for name, p in components.unet.named_parameters():
        assert (p.dtype, p.requires_grad) == ((torch.float32, True) if "lora_" in name else (torch.bfloat16, False))

    full = load_config(None, [f"model.pretrained_model_name_or_path={tiny_sd_folder}", "data.resolution=16",
                              "model.train_text_encoder=false"])
    components, trained = build_model(full, None, accelerator)
    assert {(p.dtype, p.requires_grad) for p in components.unet.parameters()} == {(torch.float32, True)}
    assert {(p.dtype, p.requires_grad) for p in components.text_encoder.parameters()} == {(torch.bfloat16, False)}


_STAND_IN = SimpleNamespace(is_main_process=True, distributed_type=None, unwrap_model=lambda model: model,
                            autocast=contextlib.nullcontext)  # one unsharded process, for export.exported


def test_what_trains_is_in_training_mode_so_lora_dropout_and_checkpointing_act(tiny_sd_folder, monkeypatch):
    """`from_pretrained` leaves a base's models in eval mode. What trains goes to training mode (as diffusers'
    examples do), else peft's `lora.dropout` would be off and transformers' text encoders would skip their
    gradient checkpointing (it checks `self.training`); what is frozen stays in eval mode."""
    import transformers.modeling_utils

    calls = []

    def counted(function, *args, **kwargs):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no")
    config = load_config(None, [f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
                                "lora.dropout=0.1", "lora.train_text_encoder=true", "model.train_text_encoder=false",
                                "data.resolution=16", "train.gradient_checkpointing=true"])
    components, trained = build_model(config, None, accelerator)
    assert trained == [components.unet, components.text_encoder]
    assert components.unet.training and components.text_encoder.training and not components.vae.training
    dropouts = [m for model in trained for name, m in model.named_modules() if "lora_dropout" in name
                and isinstance(m, torch.nn.Dropout)]
    with exported(_STAND_IN, components, []):  # validation and the base's grid sample in eval mode...
        assert not any(m.training for m in dropouts)
    assert dropouts and all(m.training for m in dropouts)  # ...and the dropout is back on after it
    ids = components.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    components.text_encoder(ids)[0].sum().backward()
    assert len(calls) == components.text_encoder.config.num_hidden_layers  # each layer recomputed in the backward

    # LoHa / LoKr have no dropout here: their layers stay in eval mode (in training mode each draws a random number
    # at every forward), also after sampling.
    loha = load_config(None, [f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
                              "lora.type=loha", "model.train_text_encoder=false", "data.resolution=16"])
    components, trained = build_model(loha, None, accelerator)
    layers = [m for m in components.unet.modules() if isinstance(m, LycorisLayer)]
    with exported(_STAND_IN, components, []):
        pass
    assert components.unet.training and layers and not any(m.training for m in layers)

    full = load_config(None, [f"model.pretrained_model_name_or_path={tiny_sd_folder}", "data.resolution=16",
                              "model.train_text_encoder=false"])
    components, trained = build_model(full, None, accelerator)
    assert components.unet.training and not components.text_encoder.training and not components.vae.training


def test_variant_and_revision_reach_every_component(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "base", variant="ema")
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "base"), variant="ema"))
    for name, value in tiny_pipeline.unet.state_dict().items():
        assert torch.equal(components.unet.state_dict()[name], value)
    with pytest.raises(OSError, match="variant"):
        load_components(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "base")))


def test_a_base_with_pickled_weights_is_refused_unless_allowed(tiny_sd_folder, tmp_path):
    """model.use_safetensors (default true): `.bin` weights are pickles, whose loading can run code."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ValueError, match=r"unet/ has no .safetensors weights \(only pickle-based .bin ones.*"
                                         r"model.use_safetensors=false"):
        load_components(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "bin")))
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "bin"),
                                              use_safetensors=False))
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(components.unet.state_dict()[name], value)


@pytest.mark.slow
def test_a_lora_run_resumes_exactly(pixel_base, tmp_path):
    """Checkpoints of a LoRA run hold the adapters (UNet and text encoder), and resuming from one is exact, also
    past a validation that only the first run drew (step 2)."""
    common = [f"model.pretrained_model_name_or_path={pixel_base}", "model.train_text_encoder=false",
              "lora.enabled=true", "lora.train_text_encoder=true", "data.cache=true", "train.max_train_steps=6",
              "train.checkpointing_steps=3", "validation.validation_steps=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(tmp_path, *common, f"train.output_dir={full}")
    for name in ("model.safetensors", "model_1.safetensors"):  # the adapters only, not the frozen base
        keys = load_file(full / "checkpoint-3" / name).keys()
        assert keys and all(".lora_" in key for key in keys), name
    resumed.mkdir()
    (resumed / "checkpoint-3").symlink_to(full / "checkpoint-3")
    _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    # Same tensors and same metadata. (Not the same bytes: safetensors writes a header of several metadata entries
    # in hash-map order, which changes from process to process.)
    name = "pytorch_lora_weights.safetensors"
    a, b = load_file(full / name), load_file(resumed / name)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert _metadata(full / name) == _metadata(resumed / name)


def _metadata(path):
    with safe_open(path, "pt") as f:
        return {key: json.loads(value) if key == "lora_adapter_metadata" else value
                for key, value in f.metadata().items()}


def test_a_half_precision_base_trains_in_float32(tiny_sd_folder, tmp_path):
    """A base stored in bf16 (e.g. the export of a bf16 run) fine-tuned with mixed_precision no: frozen parts
    come up to float32 (else the bf16 text embeddings meet a float32 UNet), and trained weights are float32."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, torch_dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "bf16-base")
    config = load_config(None, [f"model.pretrained_model_name_or_path={tmp_path / 'bf16-base'}", "data.resolution=16",
                                "model.train_text_encoder=false"])
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no")
    components, trained = build_model(config, None, accelerator)
    for model in (components.unet, components.text_encoder, components.vae):
        assert {p.dtype for p in model.parameters()} == {torch.float32}, type(model).__name__


def test_lora_refuses_a_schedule_the_base_would_not_sample_with(pixel_base):
    config = load_config(None, [f"model.pretrained_model_name_or_path={pixel_base}", "model.train_text_encoder=false",
                                "lora.enabled=true", "model.prediction_type=v_prediction"])
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no")
    with pytest.raises(ValueError, match="model.prediction_type: 'epsilon' -> 'v_prediction': a LoRA file carries"):
        build_model(config, None, accelerator)


def test_each_orientation_of_an_image_is_cached_once(tiny_sd_folder):
    """A flipped image's latent is not the flipped latent: with random flips the cache keeps one per orientation,
    encoded on first sight, and gives back exactly what encoding each would."""
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    encoder = BatchEncoder(components.vae, OneEncoder(components.text_encoder), text_trains=False, cache=True)
    pixels = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    mirrored = pixels.flip(-1)
    for image, flipped in ((pixels, False), (mirrored, True), (pixels, False), (mirrored, True)):
        encoder.samples({"key": ["a"], "flipped": torch.tensor([flipped]), "pixel_values": image},
                        torch.device("cpu"))
    assert sorted(encoder.latent_cache) == ["a", "a (flipped)"]
    moments = {key: encoder._moments(image) for key, image in (("a", pixels), ("a (flipped)", mirrored))}
    for key, value in moments.items():
        torch.testing.assert_close(encoder.latent_cache[key][0], value[0], rtol=0, atol=0)
    assert not torch.allclose(moments["a (flipped)"], moments["a"].flip(-1))  # so both are needed


def test_cache_refuses_a_key_that_names_two_images(tiny_sd_folder):
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    encoder = BatchEncoder(components.vae, OneEncoder(components.text_encoder), text_trains=False, cache=True)
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    encoder.samples({"key": ["a", "b"], "pixel_values": pixels}, torch.device("cpu"))
    encoder.samples({"key": ["b", "a"], "pixel_values": pixels.flip(0)}, torch.device("cpu"))  # same images
    with pytest.raises(ValueError, match="sample key 'a' names two different images"):
        encoder.samples({"key": ["a"], "pixel_values": pixels[1:]}, torch.device("cpu"))


def test_loaded_weights_are_aligned_before_training(tiny_sd_folder):
    """from_pretrained maps weights out of the file at unaligned addresses, and the pipeline gives them aligned
    storage: the trainer does so at load, or the first validation would change the training's float roundings
    (and a resume, loading unaligned weights again, would not continue exactly)."""
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    models = (components.unet, components.text_encoder, components.vae)
    addresses = [t.data_ptr() for m in models for t in [*m.parameters(), *m.buffers()]]
    assert all(address % 64 == 0 for address in addresses)
    components.pipeline()
    assert addresses == [t.data_ptr() for m in models for t in [*m.parameters(), *m.buffers()]]


@pytest.mark.parametrize("change", ["one value", "two values swapped"])
def test_the_cache_key_check_sees_every_pixel(change):
    """One value off by one anywhere in a 128 px image, or two values swapped (same sums), is another image."""
    encoder = BatchEncoder(None, None, text_trains=False, cache=True)
    image = torch.randint(0, 255, (1, 3, 128, 128), dtype=torch.uint8)
    other = image.clone()
    if change == "one value":
        other.view(-1)[1] += 1
    else:
        image.view(-1)[1:3] = torch.tensor([7, 9], dtype=torch.uint8)
        other.view(-1)[1:3] = torch.tensor([9, 7], dtype=torch.uint8)
    encoder._check_keys(["k"], image)
    with pytest.raises(ValueError, match="sample key 'k' names two different images"):
        encoder._check_keys(["k"], other)


@pytest.mark.slow
def test_the_sd_laion_recipe_runs_on_a_tiny_base(tiny_sd_folder, tiny_shards, tmp_path):
    """configs/sd15-lora-laion.yaml as shipped (bf16, resampled shards, workers, filters, resume: latest), with
    only the base, the data and the sizes swapped for tiny ones."""
    recipe = ROOT / "configs" / "sd15-lora-laion.yaml"
    out = tmp_path / "run"
    result = _train(tmp_path, "--config", str(recipe), f"model.pretrained_model_name_or_path={tiny_sd_folder}",
                    f"data.path={tiny_shards}/00000.tar", "data.num_samples=32", "data.resolution=16",
                    "data.num_workers=2", "data.shuffle_buffer=8", "data.bucket_step=8", "data.filters.min_width=null",
                    "data.filters.min_height=null", "data.filters.min_aesthetic=null", "lora.rank=2", "lora.alpha=2",
                    "train.max_train_steps=3",
                    "train.train_batch_size=2", f"train.output_dir={out}")
    assert "precision bf16" in result.stdout and "LoRA rank 2 on to_q, to_k, to_v, to_out.0" in result.stdout
    assert "in 3 aspect-ratio buckets" in result.stdout
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "samples" / "step-3.png").is_file()
