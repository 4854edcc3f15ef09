"""Single-file checkpoints in the original (LDM) layout, in and out: the export loads in stock diffusers'
`from_single_file` and draws the same images; at full SD-1.5 and SDXL size its keys are exactly what diffusers' own
converter reads; a single-file base trains (full and LoRA) offline; pickles and unknown files are refused."""

import json
import os
import subprocess
import sys
import sysconfig
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from finetune import single_file
from finetune.cli import UserError
from finetune.config import ConfigError, ModelConfig, load_config
from finetune.lora import WEIGHT_NAME as LORA
from finetune.model_card import model_card
from finetune.models import load_components
from finetune.results import load_result

from . import launch
from .conftest import ROOT, build_sd15_shaped, build_tiny_sdxl_pipeline
from .fake_hub import FakeHub
from .test_finetune import SD, _regrid
from .test_hub import _grid_tiles
from .test_train import _train, _two_process_launcher

SHIPPED = ROOT / "finetune" / "base_configs"


@pytest.fixture(scope="module")
def sd15_shaped(tmp_path_factory):
    return build_sd15_shaped(tmp_path_factory.mktemp("sd15-shaped") / "base")


@pytest.fixture(scope="module")
def sdxl_shaped(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl-shaped") / "base", real_depths=True)


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("shape", ["sd15", "sdxl"])
def test_the_export_draws_the_same_images_in_stock_from_single_file(shape, sd15_shaped, sdxl_shaped, tmp_path):
    """Every weight comes back bit for bit through diffusers' own LDM converter, and the images agree (fp32,
    max difference <= 1e-6, the issue's bound; they are equal here)."""
    folder = {"sd15": sd15_shaped, "sdxl": sdxl_shaped}[shape]
    cls = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[shape]
    path = single_file.save(load_components(ModelConfig(pretrained_model_name_or_path=str(folder))),
                            tmp_path / "model.safetensors", "fp32")
    with safe_open(str(path), "pt") as file:
        architecture = file.metadata()["modelspec.architecture"]
    assert architecture == {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}[shape]

    reference = cls.from_pretrained(folder, use_safetensors=True)
    loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(reference, name):
            want, got = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
            assert want.keys() == got.keys(), name
            assert all(torch.equal(want[key], got[key]) for key in want), name
    assert np.abs(_images(reference) - _images(loaded)).max() <= 1e-6


def _meta_models(name: str) -> SimpleNamespace:
    """Full-size models of a shipped base ('sd15', 'sdxl') from its published configs, on the meta device."""
    folder = SHIPPED / name

    def config(part):
        return json.loads((folder / part / "config.json").read_text())

    with init_empty_weights():
        models = SimpleNamespace(
            unet=UNet2DConditionModel.from_config(config("unet")), vae=AutoencoderKL.from_config(config("vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig(**config("text_encoder"))), text_encoder_2=None)
        if name == "sdxl":
            models.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2")))
    return models


@pytest.mark.parametrize(("name", "model_type", "counts"), [
    ("sd15", "v1", {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}),
    ("sdxl", "xl_base", {"model.diffusion_model.": 1680, "first_stage_model.": 248, "conditioner.embedders.0.": 196,
                         "conditioner.embedders.1.": 389}),
])
def test_at_full_size_the_keys_are_exactly_what_diffusers_converter_reads(name, model_type, counts):
    """SD-1.5's and SDXL base 1.0's real architectures (meta tensors, no weights): diffusers' converter
    (`loaders/single_file_utils.py`, which `from_single_file` runs) maps the export back onto every parameter
    of every model with its shape, leaving nothing out and reading every key; it tells the file's family as
    `v1` / `xl_base` from its keys (`CHECKPOINT_KEY_NAMES`). The counts per part are the models' tensors, one
    OpenCLIP `in_proj` for three q/k/v projections; published checkpoints may also carry buffers and EMA copies
    (`position_ids`, `logit_scale`, `model_ema.*`), which loaders do not need."""
    models = _meta_models(name)
    state = single_file.ldm_state(models)
    assert infer_diffusers_model_type(state) == model_type
    assert {prefix: sum(key.startswith(prefix) for key in state) for prefix in counts} == counts
    assert len(state) == sum(counts.values())
    for anchor in ("v1", "clip") if name == "sd15" else ("xl_base", "clip_sdxl", "open_clip_sdxl"):
        assert CHECKPOINT_KEY_NAMES[anchor] in state

    converted = {
        "unet": convert_ldm_unet_checkpoint(state, models.unet.config),
        "vae": convert_ldm_vae_checkpoint(state, models.vae.config),
        "text_encoder": {key.removeprefix("text_model."): value
                         for key, value in convert_ldm_clip_checkpoint(state).items()},
    }
    if name == "sdxl":
        converted["text_encoder_2"] = convert_open_clip_checkpoint(models.text_encoder_2, state,
                                                                   prefix="conditioner.embedders.1.model.")
    for part, weights in converted.items():
        expected = getattr(models, part).state_dict()
        assert weights.keys() == expected.keys(), (part, sorted(weights.keys() ^ expected.keys())[:4])
        assert all(weights[key].shape == expected[key].shape for key in expected), part


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_the_shipped_configs_make_a_folder_diffusers_reads_offline(name, tmp_path):
    """The config folder built for a single file: model_index, every component's config, the scheduler and CLIP's
    real BPE tokenizers (77 tokens, begin 49406 and end 49407)."""
    folder = single_file.shipped_config(name, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    assert ("text_encoder_2" in index) == (name == "sdxl")
    for tokenizer in ("tokenizer", "tokenizer_2") if name == "sdxl" else ("tokenizer",):
        ids = CLIPTokenizer.from_pretrained(folder, subfolder=tokenizer)("a photo of a cat", padding="max_length",
                                                                            max_length=77).input_ids
        assert len(ids) == 77 and ids[0] == 49406 and 49407 in ids and len(set(ids[1:6])) == 4
    assert json.loads((folder / "unet" / "config.json").read_text()) == json.loads(
        (ROOT / "tests" / "fixtures" / name / "unet" / "config.json").read_text())


def test_the_family_is_told_from_the_keys_or_asked_for():
    sd15 = set(single_file.ldm_state(_meta_models("sd15")))
    sdxl = set(single_file.ldm_state(_meta_models("sdxl")))
    assert single_file.family(sd15, "a.safetensors") == "sd15"
    assert single_file.family(sdxl, "b.safetensors") == "sdxl"
    sd2 = {key for key in sd15 if not key.startswith("cond_stage_model.")} | {single_file.SD2_TEXT}
    with pytest.raises(UserError, match="SD-2.x.*model.single_file_config"):
        single_file.family(sd2, "c.safetensors")
    with pytest.raises(UserError, match="no UNet in the original"):
        single_file.family({"lora_unet_down_blocks_0.alpha"}, "d.safetensors")


def test_pickles_and_non_safetensors_files_are_refused_before_reading(tmp_path):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not read")
    with pytest.raises(UserError, match=r"pickled checkpoint \(\.ckpt\).*safetensors only"):
        load_components(ModelConfig(pretrained_model_name_or_path=str(pickle)))
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_components(ModelConfig(pretrained_model_name_or_path=str(fake)))
    lora_file = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, lora_file)
    with pytest.raises(UserError, match="no UNet in the original"):
        load_components(ModelConfig(pretrained_model_name_or_path=str(lora_file)))


def test_a_file_that_does_not_fit_its_config_folder_is_refused(sd15_shaped, sdxl_shaped, tmp_path):
    path = single_file.save(load_components(ModelConfig(pretrained_model_name_or_path=str(sd15_shaped))),
                            tmp_path / "sd15.safetensors", "fp32")
    with pytest.raises(UserError, match="sd15.safetensors"):
        load_components(ModelConfig(pretrained_model_name_or_path=str(path), single_file_config=str(sdxl_shaped)))


def test_config_refusals_name_the_key():
    with pytest.raises(ConfigError, match="train.export_single_file: only a full fine-tune"):
        load_config(None, ["model.pretrained_model_name_or_path=base", "model.train_text_encoder=false",
                           "lora.enabled=true", "train.export_single_file=true"])
    with pytest.raises(ConfigError, match="train.export_single_file.*fine-tune a base"):
        load_config(None, ["train.export_single_file=true"])
    with pytest.raises(ConfigError, match="model.single_file_config: set, but"):
        load_config(None, ["model.pretrained_model_name_or_path=base", "model.single_file_config=configs"])
    with pytest.raises(ConfigError, match="model.variant / model.revision: a single-file base is one file"):
        load_config(None, ["model.pretrained_model_name_or_path=b.safetensors", "model.variant=fp16"])


def test_a_pixel_space_base_cannot_export_a_single_file(tiny_components):
    with pytest.raises(UserError, match="pixel-space model"):
        single_file.exportable(tiny_components)


@pytest.mark.slow
def test_a_single_file_base_fine_tunes_and_exports_one_file(tiny_sd_folder, tmp_path):
    """Through the trainer, offline: the base is a single file (converted once into the cache and reused), the
    full fine-tune writes its pipeline folder and `<name>.safetensors`, which stock `from_single_file` loads with
    the weights of the folder; `python -m finetune.export` of its checkpoint writes one too (the same keys)."""
    base = single_file.save(load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder))),
                            tmp_path / "base.safetensors", "fp32")
    out = tmp_path / "tuned"
    run = [*SD, f"model.pretrained_model_name_or_path={base}", f"model.single_file_config={tiny_sd_folder}",
           "train.max_train_steps=2", "train.checkpointing_steps=2", "train.export_single_file=true",
           "train.single_file_precision=fp32"]
    dry = _train(tmp_path, *run, f"train.output_dir={tmp_path / 'dry'}", "--dry-run")
    assert f"base: {base}: a single-file checkpoint ({len(load_file(base))} tensors; configs from" in dry.stdout
    assert "not converted yet" in dry.stdout and not (tmp_path / "cache" / "single-file").exists()
    missing = _train(tmp_path, *run, f"train.output_dir={tmp_path / 'dry'}", "--dry-run",
                     f"model.single_file_config={tmp_path / 'nowhere'}", check=False)
    assert missing.returncode == 2 and "model.single_file_config=" in missing.stderr and "no model_index.json" in \
        missing.stderr
    _train(tmp_path, *run, f"train.output_dir={out}")
    conversions = list((tmp_path / "cache" / "single-file").iterdir())
    assert len(conversions) == 1 and (conversions[0] / single_file.COMPLETE).is_file()
    stamp = (conversions[0] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    tuned = StableDiffusionPipeline.from_single_file(str(out / "tuned.safetensors"), config=str(tiny_sd_folder),
                                                     local_files_only=True)
    folder = {"unet": UNet2DConditionModel.from_pretrained(out, subfolder="unet"),
              "vae": AutoencoderKL.from_pretrained(out, subfolder="vae"),
              "text_encoder": CLIPTextModel.from_pretrained(out, subfolder="text_encoder")}
    for name, model in folder.items():
        want, got = model.state_dict(), getattr(tuned, name).state_dict()
        assert all(torch.equal(want[key], got[key]) for key in want), name
    original = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    assert not torch.equal(folder["unet"].conv_in.weight, original.unet.conv_in.weight)  # it trained
    launch.run([sys.executable, "-m", "finetune.export", str(out / "checkpoint-2")], cwd=tmp_path, check=True,
               capture_output=True, env={**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache")})
    exported = load_file(out / "checkpoint-2" / "pipeline" / "tuned-checkpoint-2.safetensors")
    assert exported.keys() == load_file(out / "tuned.safetensors").keys()

    _train(tmp_path, *run, f"train.output_dir={tmp_path / 'again'}", "train.export_single_file=false")
    assert (conversions[0] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


DOWNSTREAM = """
import importlib.util, re, sys
sys.path.append({purelib!r})
assert importlib.util.find_spec("finetune") is None
import numpy as np
card = open({card!r}).read()
scope = {{}}
exec(re.search(r"```python\\n(.*?)```", card, re.S).group(1), scope)
np.save("hub.npy", np.stack([np.asarray(image) for image in scope["images"]]))
"""


@pytest.mark.slow
def test_a_lora_on_a_single_file_base_samples_like_the_run(tiny_sd_folder, tmp_path):
    """A LoRA on a single-file base: the tools that load a run's output (sample, evaluate) load the base from the
    file and draw the run's final grid again exactly; so does the model card's snippet (`from_single_file`, then
    the adapters), run where this project is not installed, against a fake Hub serving the base's configs under
    the id diffusers looks them up by (`stable-diffusion-v1-5/stable-diffusion-v1-5`) and the pushed adapters. Two
    processes with a fresh cache convert the file once between them, completely, and train."""
    base = single_file.save(load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder))),
                            tmp_path / "base.safetensors", "fp32")
    out = tmp_path / "lora"
    _train(tmp_path, *SD, "validation.guidance_scale=2.0", f"model.pretrained_model_name_or_path={base}",
           f"model.single_file_config={tiny_sd_folder}", "lora.enabled=true", "train.max_train_steps=2",
           f"train.output_dir={out}", "validation.num_images_per_prompt=2")
    grid = np.asarray(Image.open(out / "samples" / "step-2.png"))
    assert np.array_equal(_regrid(load_result(str(out)), out), grid)
    # Two processes, a fresh cache: one converts (transformers writes text encoders on rank 0 only), both train.
    _train(tmp_path, *SD, f"model.pretrained_model_name_or_path={base}", f"model.single_file_config={tiny_sd_folder}",
           "lora.enabled=true", "train.max_train_steps=2", "validation.validation_steps=0", "data.num_samples=2000",
           "train.checkpointing_steps=0", f"train.output_dir={tmp_path / 'two'}", launcher=_two_process_launcher(),
           env={"ACCELERATE_USE_CPU": "1", "FINETUNE_CACHE": str(tmp_path / "cache-2")})
    [conversion] = (tmp_path / "cache-2" / "single-file").iterdir()
    assert (conversion / single_file.COMPLETE).is_file()
    assert (conversion / "text_encoder" / "model.safetensors").is_file()

    card = model_card(out, "alice/lora-on-a-file")
    assert ("from diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_single_file("{base}")\n'
            'pipe.load_lora_weights("alice/lora-on-a-file"') in card
    (tmp_path / "README.md").write_text(card)
    configs = {str(path.relative_to(tiny_sd_folder)): path.read_bytes() for path in tiny_sd_folder.rglob("*")
               if path.suffix in (".json", ".txt")}
    with FakeHub({}) as hub:
        hub.add_repo("stable-diffusion-v1-5/stable-diffusion-v1-5", configs)
        hub.add_repo("alice/lora-on-a-file", {LORA: (out / LORA).read_bytes()})
        script = DOWNSTREAM.format(purelib=sysconfig.get_paths()["purelib"], card=str(tmp_path / "README.md"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE"))}
        result = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300, env={**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
                                                  "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-4000:]
    assert np.array_equal(np.load(tmp_path / "hub.npy"), _grid_tiles(out, 2, columns=2))
