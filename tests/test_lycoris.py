"""LyCORIS adapters (`lora.type`): LoCon (LoRA on the ResNet convolutions too), LoHa and LoKr from peft, written in
the layout ComfyUI, AUTOMATIC1111 and Forge load, checked against the `lycoris-lora` package's own merge; trained
through the trainer and loaded back by this project's tools (stock diffusers cannot load LoHa / LoKr)."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from lycoris.utils import merge as lycoris_merge
from PIL import Image
from safetensors import safe_open

from finetune import lora
from finetune.cli import UserError
from finetune.config import ConfigError, LoraConfig, ModelConfig, load_config
from finetune.hub import HubPushError, finished_output
from finetune.models import load_components
from finetune.results import load_result

from .conftest import build_sd15_shaped
from .test_finetune import SD, _regrid
from .test_train import _train

TYPES = ["lora", "locon", "loha", "lokr"]


@pytest.fixture(scope="module")
def sd15_shaped(tmp_path_factory):
    return build_sd15_shaped(tmp_path_factory.mktemp("sd15-shaped") / "base")


def _adapted(folder, kind: str, text: bool = True):
    """The base with adapters of `kind` (rank 4, alpha 6: scale 1.5; convolutions rank 2, alpha 1) on the UNet and
    (`text`) the text encoder, every adapter weight random (trained adapters are not at their zero start)."""
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(folder)))
    config = LoraConfig(enabled=True, type=kind, rank=4, alpha=6.0, conv_rank=2 if kind != "lora" else None,
                        conv_alpha=1.0, train_text_encoder=text, text_encoder_rank=2,
                        target_modules=[*LoraConfig().target_modules, "ff.net.2"])
    lora.attach(components, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (components.unet, components.text_encoder):
            for param in (p for p in model.parameters() if p.requires_grad):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return components, config


class _Named(torch.nn.Module):
    """A text encoder under `text_model.`, the module path kohya-layout names carry (transformers 5's CLIPTextModel
    dropped that level), for lycoris' merge, which names modules by their path."""

    def __init__(self, encoder):
        super().__init__()
        self.text_model = encoder


@pytest.mark.parametrize("kind", TYPES)
def test_the_file_merges_in_lycoris_to_peft_s_own_weights(kind, sd15_shaped, tmp_path):
    """peft -> lora_kohya.safetensors -> the lycoris-lora package's weight loader (`lycoris.utils.merge`, what its
    tools merge with): every adapted weight of the UNet and the text encoder merged to base + peft's delta within
    1e-5 (fp32), convolutions included, and nothing in the file left unread."""
    components, config = _adapted(sd15_shaped, kind)
    lora.save_run(tmp_path, components, config)
    with safe_open(str(tmp_path / lora.KOHYA_WEIGHT_NAME), "pt") as file:
        state = {key: file.get_tensor(key) for key in file.keys()}
    expected, deltas = {}, 0
    for prefix, model in (("unet", components.unet), ("text_encoder", components.text_encoder)):
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight"):
                base = module.get_base_layer().weight.detach()
                expected[f"{prefix}.{name}"] = base + module.get_delta_weight("default")
                deltas += "conv" in name
    assert (deltas > 0) == (kind != "lora")
    plain = load_components(ModelConfig(pretrained_model_name_or_path=str(sd15_shaped)))
    lycoris_merge([_Named(plain.text_encoder)], plain.unet, dict(state), scale=1.0)
    merged = {f"unet.{name}": m.weight for name, m in plain.unet.named_modules() if hasattr(m, "weight")}
    merged.update({f"text_encoder.{name}": m.weight for name, m in plain.text_encoder.named_modules()
                   if hasattr(m, "weight")})
    for name, want in expected.items():
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-5, msg=name)
    if kind in ("loha", "lokr"):
        with safe_open(str(tmp_path / lora.KOHYA_WEIGHT_NAME), "pt") as file:
            assert file.metadata()["ss_network_module"] == "lycoris.kohya"
        assert not (tmp_path / lora.WEIGHT_NAME).exists() and (tmp_path / lora.LYCORIS_WEIGHTS).is_file()
        linear = {name: weight for name, weight in expected.items() if weight.dim() == 2}
        base = {name: weight for name, weight in _base_weights(sd15_shaped).items() if name in linear}
        checked = 0
        for module, parts in _modules(state).items():
            name = _module_name(module, linear)
            if name is not None:  # (convolutions: ComfyUI reshapes their factors; left to LyCORIS' merge above)
                torch.testing.assert_close(base[name] + _comfy_delta(parts), linear[name], rtol=0, atol=1e-5,
                                           msg=name)
                checked += 1
        assert checked == len(linear)


def _base_weights(folder) -> dict:
    plain = load_components(ModelConfig(pretrained_model_name_or_path=str(folder)))
    return {f"{prefix}.{name}": m.weight for prefix, model in (("unet", plain.unet), ("text_encoder",
                                                                                   plain.text_encoder))
            for name, m in model.named_modules() if hasattr(m, "weight")}


def _modules(state: dict) -> dict:
    modules = {}
    for key, value in state.items():
        module, part = key.split(".", 1)
        modules.setdefault(module, {})[part] = value
    return modules


def _module_name(module: str, names) -> str | None:
    """The `unet.` / `text_encoder.` module path among `names` a kohya-layout name stands for, if any."""
    for name in names:
        prefix, path = name.split(".", 1)
        kohya = ("lora_unet_" + path if prefix == "unet" else "lora_te_text_model_" + path).replace(".", "_")
        if kohya == module:
            return name
    return None


def _comfy_delta(parts: dict) -> torch.Tensor:
    """A linear layer's weight change as ComfyUI computes it (comfy/weight_adapter/loha.py and lokr.py, read in
    2026: scale = alpha / rank once, the rank read off w1_b / w2_b, and 1 when no factor is decomposed); AUTOMATIC1111
    (extensions-builtin/Lora/network_hada.py, network_lokr.py) multiplies by the same alpha / dim."""
    if "hada_w1_a" in parts:
        rank = parts["hada_w1_b"].shape[0]
        return parts["alpha"] / rank * (parts["hada_w1_a"] @ parts["hada_w1_b"]) * \
            (parts["hada_w2_a"] @ parts["hada_w2_b"])
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    dim = next((parts[p].shape[0] for p in ("lokr_w2_b", "lokr_w1_b") if p in parts), None)
    return (parts["alpha"] / dim if dim else 1.0) * torch.kron(w1, w2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
def test_each_type_trains_and_this_project_draws_the_run_s_grid_again(kind, tiny_sd_folder, tmp_path):
    """Through the trainer: LoCon's file is diffusers' own (stock `load_lora_weights`, convolutions included);
    LoHa's and LoKr's are read back by `load_result` (the tools' loader), and all draw the run's final grid
    exactly."""
    out = tmp_path / kind
    _train(tmp_path, *SD, "validation.guidance_scale=2.0", f"model.pretrained_model_name_or_path={tiny_sd_folder}",
           "lora.enabled=true", f"lora.type={kind}", "lora.lokr_factor=2", "train.max_train_steps=2",
           "train.learning_rate=1e-2", f"train.output_dir={out}")
    grid = np.asarray(Image.open(out / "samples" / "step-2.png"))
    pipeline = load_result(str(out))
    assert np.array_equal(_regrid(pipeline, out), grid)
    adapted = [name for name, _ in pipeline.unet.named_modules() if name.endswith(("resnets.0.conv1", "conv1"))]
    assert adapted
    if kind == "locon":
        assert (out / lora.WEIGHT_NAME).is_file() and any(
            "conv1" in key for key in safe_open(str(out / lora.WEIGHT_NAME), "pt").keys())
    else:
        assert not (out / lora.WEIGHT_NAME).exists() and (out / lora.KOHYA_WEIGHT_NAME).is_file()
        with pytest.raises(HubPushError, match="LoHa / LoKr adapters, which stock diffusers cannot load"):
            finished_output(out)


@pytest.mark.parametrize(("overrides", "message"), [
    (["lora.type=loha", "lora.dropout=0.1"], "lora.dropout: peft's loha has no input dropout"),
    (["lora.type=lokr", "lora.save_format=diffusers"], "lora.save_format: diffusers has no form for lokr"),
    (["lora.type=loha", "lora.use_dora=true"], "lora.use_dora: DoRA is its own lora.type"),
    (["lora.lokr_factor=0"], "lora.lokr_factor: got 0"),
    (["lora.type=lycoris"], "lora.type"),
    (["lora.type=loha", "hub.push_to_hub=true", "hub.hub_model_id=a/b"], "hub.push_to_hub: loha adapters load in"),
    (["lora.type=lokr", "hub.push_to_hub=true", "hub.hub_model_id=a/b"], "hub.push_to_hub: lokr adapters load in"),
    (["textual_inversion.placeholder_tokens=[<sks>]", "textual_inversion.initializer_tokens=[dog]",
      "hub.push_to_hub=true", "hub.hub_model_id=a/b"], "hub.push_to_hub: the model card does not describe textual"),
])
def test_adapter_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.pretrained_model_name_or_path=base", "model.train_text_encoder=false",
                           "lora.enabled=true", *overrides])


def test_a_lokr_factor_that_divides_no_layer_is_refused_naming_it(tiny_sd_folder):
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    with pytest.raises(UserError, match=r"lora.lokr_factor: 7 does not divide the dimensions \(16, 16\)"):
        lora.attach(components, LoraConfig(enabled=True, type="lokr", lokr_factor=7))


@pytest.mark.parametrize("base", ["tiny_sd_folder", "sd15_shaped"])
@pytest.mark.parametrize("text", [False, True], ids=["unet", "unet-and-text"])
@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_stock_diffusers_loads_adapters_outside_the_attention_projections(kind, text, base, request, tmp_path):
    """diffusers' converter renames only the attention projections it knows; of a half-renamed file (LoCon's
    convolutions beside them) `load_lora_weights` silently loaded none of the attention adapters when a
    convolution's key came first (the tiny base, whose first level has no attention; 16 adapters missing). Such a
    file keeps peft's names throughout, and every adapter comes back with its own scale (conv_alpha included)."""
    folder = request.getfixturevalue(base)
    components, config = _adapted(folder, kind, text)
    lora.save_run(tmp_path, components, config)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, use_safetensors=True)
    pipe.load_lora_weights(tmp_path)
    loaded = dict(pipe.unet.named_modules())
    adapted = [(name, m) for name, m in components.unet.named_modules() if hasattr(m, "get_delta_weight")]
    assert any("conv" in name for name, _ in adapted) == (kind == "locon")
    for name, module in adapted:
        other = loaded[name]
        assert hasattr(other, "get_delta_weight"), name
        torch.testing.assert_close(other.get_delta_weight(next(iter(other.scaling))),
                                   module.get_delta_weight("default"), rtol=0, atol=1e-6, msg=name)


def test_dora_is_a_type_too():
    assert LoraConfig(enabled=True, type="dora").use_dora
