"""LoRA files every tool loads: the kohya layout (ComfyUI, AUTOMATIC1111, Forge) beside diffusers' own, on a base
with SD-1.5's real block layout (its published configs, tests/fixtures/sd15, with every width shrunk)."""


import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from finetune import lora
from finetune.cli import UserError
from finetune.config import LoraConfig, ModelConfig
from finetune.models import load_components

from .conftest import build_sd15_shaped, build_tiny_sdxl_pipeline

# The kohya module names of SD-1.5's cross-attention projections and CLIP-L's attention projections, as published
# kohya-format SD-1.x LoRAs name them: the same names are listed in PaddlePaddle/PaddleNLP
# ppdiffusers/ppdiffusers/webui_lora_helper.py (`safetensors_weight_mapping`, the keys of WebUI LoRA files), e.g.
# lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0 and
# lora_te_text_model_encoder_layers_11_self_attn_q_proj. SD-1.5 has cross-attention in down blocks 0-2 (2 each),
# the mid block (1) and up blocks 1-3 (3 each); CLIP-L has 12 layers.
ATTENTIONS = ([f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)] + ["mid_block_attentions_0"]
              + [f"up_blocks_{b}_attentions_{a}" for b in (1, 2, 3) for a in range(3)])
UNET_MODULES = {f"lora_unet_{block}_transformer_blocks_0_attn2_{proj}" for block in ATTENTIONS
                for proj in ("to_q", "to_k", "to_v", "to_out_0")}
TEXT_MODULES = {f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}" for layer in range(12)
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj")}


@pytest.fixture(scope="module")
def sd15_shaped(tmp_path_factory):
    return build_sd15_shaped(tmp_path_factory.mktemp("sd15-shaped") / "base")


@pytest.fixture(scope="module")
def lora_output(sd15_shaped, tmp_path_factory):
    """Adapters (rank 2, alpha 6: scale 3; text encoder rank 2, alpha 1) with random weights, saved both ways."""
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(sd15_shaped)))
    config = LoraConfig(enabled=True, rank=2, alpha=6, train_text_encoder=True, text_encoder_rank=2,
                        text_encoder_alpha=1)
    unet, text_encoder = lora.attach(components, config)
    torch.manual_seed(1)
    for model in (unet, text_encoder):
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = torch.randn_like(param) * 0.3
    out = tmp_path_factory.mktemp("lora") / "my-lora"
    lora.save(out, unet, text_encoder, config.save_format)
    return out


def test_the_kohya_file_names_modules_as_published_lora_files_do(lora_output):
    with safe_open(str(lora_output / lora.KOHYA_WEIGHT_NAME), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alphas = {key.rsplit(".", 1)[0]: f.get_tensor(key).item() for key in keys if key.endswith(".alpha")}
    modules = {key.split(".")[0] for key in keys}
    assert modules == UNET_MODULES | TEXT_MODULES
    assert keys == {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    # the real alphas (diffusers' converter writes the rank: 2), so every client scales by alpha / rank
    assert {alphas[m] for m in UNET_MODULES} == {6.0} and {alphas[m] for m in TEXT_MODULES} == {1.0}
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "6"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_output_name"] == "my-lora"


def test_stock_diffusers_draws_the_same_images_from_either_file(sd15_shaped, lora_output):
    """diffusers reads the kohya file through its own kohya converter: the same images as from its own format."""
    def images(weight_name: str | None) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(sd15_shaped, safety_checker=None, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        if weight_name:
            pipe.load_lora_weights(str(lora_output), weight_name=weight_name)
        return pipe(["a red circle", "a blue square"], num_inference_steps=3, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    base, ours, kohya = images(None), images(lora.WEIGHT_NAME), images(lora.KOHYA_WEIGHT_NAME)
    assert np.abs(ours - base).max() > 1e-3  # the adapters change the images ...
    np.testing.assert_allclose(kohya, ours, atol=1e-5)  # ... and both files change them alike


def test_the_project_s_own_pixel_models_get_the_diffusers_file_alone(tiny_components, tmp_path):
    unet, = lora.attach(tiny_components, LoraConfig(enabled=True))
    lora.save(tmp_path, unet, None, "auto")
    assert (tmp_path / lora.WEIGHT_NAME).is_file() and not (tmp_path / lora.KOHYA_WEIGHT_NAME).exists()


def test_dora_with_the_kohya_file_is_refused():
    with pytest.raises(ValueError, match="lora.save_format: both: a DoRA's magnitudes have no kohya form"):
        LoraConfig(enabled=True, use_dora=True, save_format="both")


# SDXL: the kohya module names are the original (LDM) UNet's, as kohya's sd-scripts write SDXL LoRAs and as
# ComfyUI, Forge and AUTOMATIC1111 map them (shared/INTEROP.md). SDXL base's UNet (Stability's generative-models,
# configs/inference/sd_xl_base.yaml: num_res_blocks 2, transformer_depth [0, 2, 10], transformer_depth_middle 10)
# has its transformers at input_blocks 4, 5 (2 blocks each) and 7, 8 (10), middle_block 1 (10), output_blocks
# 0-2 (10) and 3-5 (2), e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k and
# lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_q; CLIP-L has 12 layers, OpenCLIP-G 32.
XL_TRANSFORMERS = ({f"input_blocks_{i}_1": 2 for i in (4, 5)} | {f"input_blocks_{i}_1": 10 for i in (7, 8)}
                   | {"middle_block_1": 10} | {f"output_blocks_{i}_1": 10 for i in (0, 1, 2)}
                   | {f"output_blocks_{i}_1": 2 for i in (3, 4, 5)})
XL_UNET_MODULES = {f"lora_unet_{block}_transformer_blocks_{k}_attn2_{proj}" for block, depth in XL_TRANSFORMERS.items()
                   for k in range(depth) for proj in ("to_q", "to_k", "to_v", "to_out_0")}
XL_TEXT_MODULES = {f"lora_te{n}_text_model_encoder_layers_{layer}_self_attn_{proj}" for n, layers in ((1, 12), (2, 32))
                   for layer in range(layers) for proj in ("q_proj", "k_proj", "v_proj", "out_proj")}


@pytest.fixture(scope="module", params=["lora", "locon"])
def sdxl_lora(request, tmp_path_factory):
    """A base with SDXL base 1.0's own block and layer counts (widths shrunk) and adapters on the UNet and both
    encoders (rank 2, alpha 6; encoders rank 2, alpha 1; with LoCon also the ResNets' convolutions, rank 2, alpha 4)
    with random weights, saved both ways."""
    base = build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl-shaped") / "base", real_depths=True)
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(base)))
    config = LoraConfig(enabled=True, type=request.param, rank=2, alpha=6, conv_alpha=4, train_text_encoder=True,
                        text_encoder_rank=2, text_encoder_alpha=1)
    models = lora.attach(components, config)
    torch.manual_seed(1)
    for model in models:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = torch.randn_like(param) * 0.3
    out = tmp_path_factory.mktemp("lora") / "my-xl-lora"
    lora.save_run(out, components, config)
    return base, out


def test_the_sdxl_kohya_file_names_modules_as_sdxl_lora_files_do(sdxl_lora):
    _, out = sdxl_lora
    with safe_open(str(out / lora.KOHYA_WEIGHT_NAME), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alphas = {key.rsplit(".", 1)[0]: f.get_tensor(key).item() for key in keys if key.endswith(".alpha")}
    modules = {key.split(".")[0] for key in keys}
    resnets = modules - XL_UNET_MODULES - XL_TEXT_MODULES
    assert XL_UNET_MODULES | XL_TEXT_MODULES <= modules
    assert {alphas[m] for m in XL_UNET_MODULES} == {6.0} and {alphas[m] for m in XL_TEXT_MODULES} == {1.0}
    # LoCon: every ResNet of SDXL's layout (2 per input level, 3 per output level, 2 in the middle block) by its
    # LDM name, its convolutions as kohya's sd-scripts name them (in_layers_2, out_layers_3, skip_connection).
    if resnets:
        assert {m.removesuffix("_in_layers_2") for m in resnets if m.endswith("_in_layers_2")} == {
            *(f"lora_unet_input_blocks_{i}_0" for i in (1, 2, 4, 5, 7, 8)), "lora_unet_middle_block_0",
            "lora_unet_middle_block_2", *(f"lora_unet_output_blocks_{i}_0" for i in range(9))}
    assert all(re.fullmatch(r"lora_unet_(input_blocks_\d_0|middle_block_[02]|output_blocks_\d_0)_(in_layers_2|"
                            r"out_layers_3|skip_connection)", m) for m in resnets)
    assert {alphas[m] for m in resnets} <= {4.0}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_stock_diffusers_draws_the_same_sdxl_images_from_either_file(sdxl_lora):
    """diffusers reads the LDM names back through its own SGM-to-diffusers mapping: the same images as its format."""
    base, out = sdxl_lora

    def images(weight_name: str | None) -> np.ndarray:
        pipe = StableDiffusionXLPipeline.from_pretrained(base, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        if weight_name:
            pipe.load_lora_weights(str(out), weight_name=weight_name)
        return pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    plain, ours, kohya = images(None), images(lora.WEIGHT_NAME), images(lora.KOHYA_WEIGHT_NAME)
    assert np.abs(ours - plain).max() > 1e-3
    np.testing.assert_allclose(kohya, ours, atol=1e-5)


def test_an_sdxl_kohya_file_is_refused_for_adapters_it_cannot_name(tiny_sdxl_folder, tmp_path):
    """Adapters outside the attention blocks and ResNets (here the timestep embedding) have no name in the SDXL
    kohya file yet: `both` is refused before training, `auto` writes the diffusers file alone."""
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl_folder)))
    target = "time_embedding.linear_1"
    with pytest.raises(UserError, match="lora.save_format: both: .*time_embedding"):
        lora.attach(components, LoraConfig(enabled=True, save_format="both", target_modules=["to_q", target]))
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl_folder)))
    config = LoraConfig(enabled=True, target_modules=["to_q", target])
    lora.attach(components, config)
    lora.save_run(tmp_path, components, config)
    assert (tmp_path / lora.WEIGHT_NAME).is_file() and not (tmp_path / lora.KOHYA_WEIGHT_NAME).exists()
