"""Textual inversion and pivotal tuning (textual_inversion:): new tokens whose rows alone train, the files stock
diffusers (and AUTOMATIC1111 / ComfyUI, by their layout) load, redrawing the trainer's own grids."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.config import ConfigError, ModelConfig, TextualInversionConfig, config_yaml, load_config
from finetune.embeddings import add_tokens, expand, keep_rows, train_rows
from finetune.models import load_components
from finetune.validation import sample_grid

from .test_train import _train

SD = ["data.resolution=16", "model.train_text_encoder=false", "validation.guidance_scale=2.0",
      "validation.prompts=[a <sks> shape, a red circle]", "data.caption_prefix=<sks>",
      "textual_inversion.placeholder_tokens=[<sks>]", "textual_inversion.initializer_tokens=[dog]",
      "train.learning_rate=5e-2", "train.use_ema=false"]


def _grid(folder, step):
    return np.asarray(Image.open(folder / "samples" / f"step-{step}.png"))


def _regrid(pipe, folder):
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(sample_grid(pipe, load_config(folder / "config.yaml").validation))


def test_only_the_new_rows_change_and_prompts_spell_out_their_vectors(tiny_sd_folder):
    """Two vectors for <sks> (tokens <sks> and <sks>_1, as diffusers names them), each starting from the mean of
    "dog"'s token embeddings; an optimizer step with weight decay moves those rows only; a caption's <sks> becomes
    both tokens."""
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    config = TextualInversionConfig(placeholder_tokens=["<sks>"], initializer_tokens=["dog"], num_vectors=2)
    before = components.text_encoder.get_input_embeddings().weight.detach().clone()
    add_tokens(components, config)
    tokenizer, weight = components.tokenizer, components.text_encoder.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    assert ids == [len(before), len(before) + 1] and weight.shape[0] == len(before) + 2
    dog = tokenizer("dog", add_special_tokens=False).input_ids
    torch.testing.assert_close(weight[ids].detach(), before[dog].mean(0).expand(2, -1), rtol=0, atol=0)
    assert expand(tokenizer, ["a <sks> dog", "a cat"]) == ["a <sks> <sks>_1 dog", "a cat"]

    trained = train_rows(components, config, [], alone=True)
    assert trained == [components.text_encoder]
    assert [p for p in components.text_encoder.parameters() if p.requires_grad] == [weight]
    assert not any(p.requires_grad for p in components.unet.parameters())
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.1)
    keep_rows(optimizer, [weight])
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert torch.equal(weight[:len(before)].detach(), before)
    assert not torch.equal(weight[ids].detach(), before[dog].mean(0).expand(2, -1))


@pytest.mark.parametrize("overrides, message", [
    (["textual_inversion.placeholder_tokens=[<sks>]"], "give one word per placeholder"),
    (["textual_inversion.placeholder_tokens=[<sks>]", "textual_inversion.initializer_tokens=[dog]"],
     "model.pretrained_model_name_or_path"),
    (["textual_inversion.placeholder_tokens=[a b]", "textual_inversion.initializer_tokens=[dog]"], "without spaces"),
    (["textual_inversion.placeholder_tokens=[<sks>]", "textual_inversion.initializer_tokens=[dog]",
      "model.pretrained_model_name_or_path=x", "model.train_text_encoder=false", "train.use_ema=true"],
     "train.use_ema: textual inversion alone"),
])
def test_a_bad_textual_inversion_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.slow
def test_textual_inversion_alone_and_pivotal_tuning_reload_in_stock_diffusers(tiny_sd_folder, tmp_path):
    """Alone (2 vectors): `sks.safetensors` holds {"emb_params": (2, 16)} (the layout AUTOMATIC1111 and ComfyUI read
    from a single-tensor file, diffusers with token=), the UNet and the text encoder's other rows come out as the
    base's, and stock `load_textual_inversion` draws the trainer's final grid exactly. With a LoRA (pivotal): the
    same with `load_lora_weights` too. A run resumed at step 2 ends with the same embeddings."""
    alone, pivotal = tmp_path / "alone", tmp_path / "pivotal"
    common = [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "train.max_train_steps=4"]
    result = _train(tmp_path, *common, "textual_inversion.num_vectors=2", "train.checkpointing_steps=2",
                    f"train.output_dir={alone}")
    assert "trainable 896 " in result.stdout  # (the embedding matrix, 54 + 2 rows x 16; all but 2 rows put back)
    with safe_open(alone / "sks.safetensors", "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (2, 16)
        assert f.metadata()["placeholder"] == "<sks>"
    assert not (alone / "unet").exists() and not (alone / "pytorch_lora_weights.safetensors").exists()
    base = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    (trained,) = load_file(alone / "checkpoint-4" / "model.safetensors").values()  # (the embedding matrix alone)
    assert torch.equal(trained[:54], base.text_encoder.get_input_embeddings().weight.detach())

    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    stock.load_textual_inversion(alone / "sks.safetensors", token="<sks>")
    assert np.array_equal(_regrid(stock, alone), _grid(alone, 4))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint-2").symlink_to(alone / "checkpoint-2")
    _train(tmp_path, *common, "textual_inversion.num_vectors=2", "train.checkpointing_steps=2",
           f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    assert torch.equal(load_file(resumed / "sks.safetensors")["emb_params"],
                       load_file(alone / "sks.safetensors")["emb_params"])

    _train(tmp_path, *common, "lora.enabled=true", f"train.output_dir={pivotal}")
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    stock.load_lora_weights(pivotal)
    stock.load_textual_inversion(pivotal / "sks.safetensors", token="<sks>")
    assert np.array_equal(_regrid(stock, pivotal), _grid(pivotal, 4))


@pytest.mark.slow
def test_sdxl_textual_inversion_writes_both_encoders_rows(tiny_sdxl_folder, tmp_path):
    """SDXL: {"clip_l": (1, 16), "clip_g": (1, 24)}, the layout AUTOMATIC1111 / Forge and ComfyUI read for SDXL
    embeddings; stock diffusers loads each part into its encoder (as its docs show) and draws the final grid."""
    out = tmp_path / "xl"
    _train(tmp_path, *SD, f"model.pretrained_model_name_or_path={tiny_sdxl_folder}", "train.max_train_steps=3",
           f"train.output_dir={out}")
    state = load_file(out / "sks.safetensors")
    assert sorted(state) == ["clip_g", "clip_l"] and state["clip_l"].shape == (1, 16)
    assert state["clip_g"].shape == (1, 24)
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    stock.load_textual_inversion(state["clip_l"], token="<sks>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(state["clip_g"], token="<sks>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    assert np.array_equal(_regrid(stock, out), _grid(out, 3))


def test_the_projects_tools_load_a_textual_inversion_output(tiny_sd_folder, tmp_path):
    """`results.load_result` (finetune.sample, evaluate, the web page) loads a textual-inversion output as its base
    with the embeddings in, and this project's pipeline spells out a multi-vector token as diffusers' do."""
    from finetune.embeddings import save
    from finetune.results import check_folder, load_result

    config = load_config(None, [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}",
                                "textual_inversion.num_vectors=2"])
    components = load_components(config.model)
    add_tokens(components, config.textual_inversion)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(config_yaml(config))
    save(out, components, config.textual_inversion)
    assert check_folder(out) is None
    pipeline = load_result(str(out))
    assert pipeline.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"]) == [54, 55]
    assert pipeline.maybe_convert_prompt("a <sks>", pipeline.tokenizer) == "a <sks> <sks>_1"
    torch.testing.assert_close(pipeline.text_encoder.get_input_embeddings().weight[54:].detach(),
                               components.text_encoder.get_input_embeddings().weight[54:].detach(), rtol=0, atol=0)


@pytest.mark.slow
def test_pivotal_tuning_stops_the_embeddings_after_its_fraction_and_resumes_exactly(tiny_sd_folder, tmp_path):
    """train_fraction 0.5 of 6 steps: the new rows move until step 3 and then stay (checkpoint-4's and the final
    file's rows equal checkpoint-3's) while the LoRA goes on; a run resumed at step 4, past the cut, ends with the same
    embeddings and adapters."""
    common = [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
              "textual_inversion.train_fraction=0.5", "train.max_train_steps=6", "train.checkpointing_steps=1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(tmp_path, *common, "train.checkpoints_total_limit=null", f"train.output_dir={full}")

    def rows(step):
        (weight,) = load_file(full / f"checkpoint-{step}" / "model_1.safetensors").values()
        return weight[54:]

    assert not torch.equal(rows(2), rows(3)) and torch.equal(rows(3), rows(4)) and torch.equal(rows(3), rows(6))
    assert torch.equal(load_file(full / "sks.safetensors")["emb_params"], rows(3))
    lora = [load_file(full / f"checkpoint-{s}" / "model.safetensors") for s in (4, 6)]
    assert any(not torch.equal(lora[0][k], lora[1][k]) for k in lora[0])  # the LoRA went on
    resumed.mkdir()
    (resumed / "checkpoint-4").symlink_to(full / "checkpoint-4")
    _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    for name in ("sks.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_pivotal_tuning_keeps_the_text_encoders_lora_training_and_casts_like_lora(tiny_sd_folder):
    """With lora.train_text_encoder the text encoder's adapters train beside the new rows; frozen weights take the
    run's precision (bf16) while the embedding matrix trains in float32, its base rows the base's exactly; only the
    new rows get a gradient."""
    from types import SimpleNamespace

    from finetune.train import build_model

    config = load_config(None, [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
                                "lora.train_text_encoder=true", "train.mixed_precision=bf16"])
    components, trained = build_model(config, None, SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16"))
    encoder = components.text_encoder
    weight = encoder.get_input_embeddings().weight
    assert trained == [components.unet, encoder]
    assert any("lora_A" in n for n, p in encoder.named_parameters() if p.requires_grad) and weight.requires_grad
    assert weight.dtype == torch.float32 and encoder.get_input_embeddings() is not None
    assert next(p for n, p in encoder.named_parameters() if "q_proj.base_layer" in n).dtype == torch.bfloat16
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    keep_rows(optimizer, [weight])
    base = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder))).text_encoder
    assert torch.equal(weight[:54].detach(), base.get_input_embeddings().weight.detach())
    ids = components.tokenizer(["a <sks> shape"], padding="max_length", return_tensors="pt").input_ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoder(ids)[0].float().square().mean().backward()
    assert weight.grad[:54].abs().max() == 0 and weight.grad[54].abs().max() > 0


@pytest.mark.parametrize("tokens, message", [
    (["<Sks>"], "does not read '<Sks>' back as one token"),
    (["x"], "'x' is already a word"),  # (the test tokenizer spells words out: its words are letters)
])
def test_a_placeholder_the_tokenizer_cannot_own_is_refused(tiny_sd_folder, tokens, message):
    from finetune.cli import UserError

    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    with pytest.raises(UserError, match=message):
        add_tokens(components, TextualInversionConfig(placeholder_tokens=tokens, initializer_tokens=["cat"],
                                                      num_vectors=2))


def test_placeholders_sharing_a_file_name_or_an_unfit_optimizer_are_refused():
    with pytest.raises(ConfigError, match="would share a file name"):
        TextualInversionConfig(placeholder_tokens=["<sks>", "sks"], initializer_tokens=["a", "b"])
    with pytest.raises(ConfigError, match="adamw_schedulefree"):
        load_config(None, ["model.pretrained_model_name_or_path=x", "model.train_text_encoder=false",
                           "train.use_ema=false", "train.optimizer=adamw_schedulefree",
                           "textual_inversion.placeholder_tokens=[<sks>]", "textual_inversion.initializer_tokens=[a]"])


def test_a_pivotal_runs_bundled_lora_holds_its_embeddings_as_the_loaders_read_them(tiny_sd_folder, tmp_path):
    """lora_kohya_bundled.safetensors = lora_kohya.safetensors + the embeddings under the keys the loaders look for:
    ComfyUI's `comfy/sd1_clip.py load_embed` joins the keys starting `bundle_emb.` and ending `.string_to_param.*`
    (SD-1.x) or `.clip_l` / `.clip_g` (SDXL); AUTOMATIC1111's LoRA loader groups `bundle_emb.<name>.<part>` by
    name. The plain kohya file stays without them (diffusers' kohya converter refuses keys it does not rename)."""
    from finetune.embeddings import save
    from finetune.lora import attach, save_run

    config = load_config(None, [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
                                "textual_inversion.num_vectors=2"])
    components = load_components(config.model)
    add_tokens(components, config.textual_inversion)
    attach(components, config.lora)
    save_run(tmp_path, components, config.lora)
    save(tmp_path, components, config.textual_inversion)
    plain, bundled = load_file(tmp_path / "lora_kohya.safetensors"), load_file(tmp_path /
                                                                               "lora_kohya_bundled.safetensors")
    extra = sorted(set(bundled) - set(plain))
    assert extra == ["bundle_emb.sks.string_to_param.*"] and all(torch.equal(plain[k], bundled[k]) for k in plain)
    joined = torch.cat([bundled[k] for k in bundled if k.startswith("bundle_emb.") and
                        k.endswith(".string_to_param.*")])  # (ComfyUI's rule)
    assert torch.equal(joined, load_file(tmp_path / "sks.safetensors")["emb_params"]) and joined.shape == (2, 16)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    pipe.load_lora_weights(tmp_path, weight_name="lora_kohya.safetensors")  # (still loads in stock diffusers)
