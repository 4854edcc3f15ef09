"""LoRA adapters: attached where the text enters, saved in the diffusers format, reloaded exactly downstream."""

import json
import logging
import re
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from finetune import lora
from finetune.config import LoraConfig, ModelConfig
from finetune.models import load_components, sample_as_downstream
from pipelines import TextToImageDDPMPipeline


def _perturb(models, seed=1):
    """Stand-in for training: every adapter weight random (B too, so the adapters change the output)."""
    generator = torch.Generator().manual_seed(seed)
    for model in models:
        for p in model.parameters():
            if p.requires_grad:
                p.data = torch.randn(p.shape, generator=generator) * 0.3


def _sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a red circle", "a cat"], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def _adapted(folder, autocast=False, **lora_kwargs):
    """The base's components with adapters (perturbed), sampling as the trainer samples a LoRA run."""
    config = ModelConfig(pretrained_model_name_or_path=str(folder))
    components = load_components(config)
    sample_as_downstream(config, components)
    trained = lora.attach(components, LoraConfig(enabled=True, **lora_kwargs), autocast=autocast)
    _perturb(trained)
    return components, trained


def test_defaults_target_the_cross_attention_only(tiny_sd_folder):
    components, trained = _adapted(tiny_sd_folder)
    assert trained == [components.unet]
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in components.unet.named_parameters() if ".lora_A" in name}
    assert adapted and all(".attn2." in name for name in adapted)
    assert {name.rsplit(".", 1)[-1] if "to_out" not in name else "to_out.0" for name in adapted} == \
        {"to_q", "to_k", "to_v", "to_out.0"}
    assert not any(p.requires_grad for name, p in components.unet.named_parameters() if "lora_" not in name)
    assert not any(p.requires_grad for p in components.text_encoder.parameters())


def _bf16_step(unet) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Loss, adapter gradients and the number of dtype copies of one forward and backward under bf16 autocast."""
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 5, 16, generator=generator)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample
        loss = pred.float().square().mean()
        loss.backward()
    grads = [p.grad.clone() for p in unet.parameters() if p.requires_grad]
    unet.zero_grad(set_to_none=True)
    return loss.detach(), grads, sum(e.count for e in profile.key_averages() if e.key == "aten::_to_copy")


def test_under_autocast_adapters_skip_the_input_casts_with_identical_numbers(tiny_sd_folder):
    """In a mixed-precision run the adapters skip peft's cast of their bf16 inputs to the fp32 adapter weights
    (autocast casts them straight back): the same loss and adapter gradients, bit for bit, with fewer copies. With
    adapter dropout or DoRA (whose numbers would change), or without autocast, the casts stay."""
    components, _ = _adapted(tiny_sd_folder, autocast=True)
    unet = components.unet.to(torch.bfloat16)
    cast_training_params(unet, dtype=torch.float32)
    adapter_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    assert adapter_layers and not any(m.cast_input_dtype_enabled for m in adapter_layers)
    loss, grads, copies = _bf16_step(unet)
    for layer in adapter_layers:
        layer.cast_input_dtype_enabled = True  # peft's default
    loss_cast, grads_cast, copies_cast = _bf16_step(unet)
    assert torch.equal(loss, loss_cast) and len(grads) == len(grads_cast) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_cast))
    assert copies < copies_cast
    for kept in (dict(autocast=True, dropout=0.1), dict(autocast=True, use_dora=True), dict(autocast=False)):
        components, _ = _adapted(tiny_sd_folder, **kept)
        assert all(m.cast_input_dtype_enabled for m in components.unet.modules() if isinstance(m, BaseTunerLayer))


def test_reloads_exactly_in_a_stock_stable_diffusion_pipeline(tiny_sd_folder, tmp_path):
    """rank 4 with alpha 8 on the UNet and rank 2 with alpha 1 on the text encoder: only the adapter metadata in
    the file tells load_lora_weights those scales."""
    components, _ = _adapted(tiny_sd_folder, alpha=8, train_text_encoder=True, text_encoder_rank=2,
                             text_encoder_alpha=1)
    path = lora.save(tmp_path, components.unet, components.text_encoder)
    trained = _sample(components.pipeline())

    with safe_open(path, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (4, 8)
    assert (metadata["text_encoder.r"], metadata["text_encoder.lora_alpha"]) == (2, 1)

    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    base = _sample(stock, guidance_scale=1.0)
    stock.load_lora_weights(tmp_path)
    assert np.abs(_sample(stock, guidance_scale=1.0) - trained).max() == 0
    assert np.abs(base - trained).max() > 1e-3  # the adapters do change the output


class _Messages(logging.Handler):
    """Every warning diffusers, transformers and peft log or raise while it is installed: an adapter key a loader
    reports unexpected or missing is a warning there (transformers' load report, diffusers' and peft's checks), and
    the load goes on without it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []
        self.loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")

    def __enter__(self):
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.addHandler(self)
            logger.setLevel(logging.WARNING)
        self.caught = warnings.catch_warnings(record=True)
        self.warnings = self.caught.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.caught.__exit__(*exc)
        self.messages += [f"{w.category.__name__}: {w.message}" for w in self.warnings]
        for logger, level in zip(self.loggers, self.levels):
            logger.removeHandler(self)
            logger.setLevel(level)


def _adapter_weights(model) -> dict[str, torch.Tensor]:
    """The adapter parameters (lora_A, lora_B, DoRA's lora_magnitude_vector) by name, without the adapter's name
    (`default` when trained here, `default_0` when load_lora_weights names it)."""
    return {re.sub(r"\.default(_\d+)?(?=\.|$)", "", name): p.detach() for name, p in model.named_parameters()
            if "lora_" in name}


def _encode(pipe, prompts=("a red circle", "a cat")) -> torch.Tensor:
    ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@pytest.mark.parametrize("base", ["stable_diffusion", "ours"])
def test_dora_on_unet_and_text_encoder_reloads_exactly(base, tiny_sd_folder, request, tmp_path):
    """DoRA adapters with trained (here random) magnitudes on both models: the stock loader must restore every
    adapter weight, magnitudes included, and report no key unexpected or missing. (transformers 5 loads the text
    encoder's adapters by its own renaming, which needs `lora_magnitude_vector.weight`; peft's own name
    `lora_magnitude_vector` was reported unexpected there and the magnitudes stayed at the base's weight norms.)"""
    folder, pipeline_class = ((tiny_sd_folder, StableDiffusionPipeline) if base == "stable_diffusion" else
                              (request.getfixturevalue("pixel_base"), TextToImageDDPMPipeline))
    components, _ = _adapted(folder, use_dora=True, init="gaussian", train_text_encoder=True, text_encoder_rank=2)
    lora.save(tmp_path, components.unet, components.text_encoder)
    trained = components.pipeline()
    trained_images, trained_text = _sample(trained, guidance_scale=1.0), _encode(trained)

    stock = pipeline_class.from_pretrained(folder)
    base_text = _encode(stock)
    with _Messages() as load:
        stock.load_lora_weights(tmp_path)
    assert load.messages == []

    for name, model in (("unet", components.unet), ("text_encoder", components.text_encoder)):
        reloaded, expected = _adapter_weights(getattr(stock, name)), _adapter_weights(model)
        assert reloaded.keys() == expected.keys() and any("lora_magnitude_vector" in k for k in expected), name
        assert all(torch.equal(reloaded[k], expected[k]) for k in expected), name
    assert torch.equal(_encode(stock), trained_text)
    assert (base_text - trained_text).abs().max() > 1e-3  # the text encoder's adapters do change its output
    assert np.abs(_sample(stock, guidance_scale=1.0) - trained_images).max() == 0


@pytest.fixture
def pixel_base(tiny_pipeline, tmp_path):
    folder = tmp_path / "base"
    tiny_pipeline.save_pretrained(folder)
    return folder


def test_our_pipeline_reloads_fuses_and_weights_adapters(pixel_base, tmp_path):
    components, _ = _adapted(pixel_base, rank=2, alpha=3)
    lora.save(tmp_path / "lora", components.unet, None)
    trained = _sample(components.pipeline(), guidance_scale=2.0)

    pipe = TextToImageDDPMPipeline.from_pretrained(pixel_base)
    base = _sample(pipe, guidance_scale=2.0)
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="shapes")
    assert np.abs(_sample(pipe, guidance_scale=2.0) - trained).max() == 0

    pipe.set_adapters(["shapes"], adapter_weights=[0.0])
    assert np.abs(_sample(pipe, guidance_scale=2.0) - base).max() < 1e-6
    pipe.set_adapters(["shapes"], adapter_weights=[1.0])
    pipe.fuse_lora()
    assert np.abs(_sample(pipe, guidance_scale=2.0) - trained).max() < 1e-4  # the same maths, rounded differently
    pipe.unfuse_lora()
    assert np.abs(_sample(pipe, guidance_scale=2.0) - trained).max() < 1e-4


def test_a_target_that_matches_nothing_names_the_layers(pixel_base):
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(pixel_base)))
    with pytest.raises(ValueError, match=r"lora.target_modules.*to_k"):
        lora.attach(components, LoraConfig(enabled=True, target_modules=["attn9.to_q"]))


def test_stock_scheduler_matches_ours_in_the_reload(tiny_sd_folder):
    """The trainer samples with this project's DDPMScheduler built from the base's scheduler config; a stock
    pipeline keeps diffusers' own. The same config must mean the same scheduler, or exact reloads are luck."""
    ours = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder))).scheduler
    stock = DDPMScheduler.from_pretrained(tiny_sd_folder, subfolder="scheduler")
    for scheduler in (ours, stock):
        scheduler.set_timesteps(10)
    assert torch.equal(ours.timesteps, stock.timesteps)
    assert torch.equal(ours.alphas_cumprod, stock.alphas_cumprod)
