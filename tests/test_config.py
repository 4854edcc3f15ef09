"""The config schema: shipped configs load, bad configs fail with messages that say what to do."""

from pathlib import Path

import pytest

from finetune.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_shipped_configs_exist():
    assert "shapes.yaml" in [p.name for p in SHIPPED]


def test_defaults_load():
    config = load_config(None)
    assert config.train.output_dir and config.data.source == "builtin"


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(_write(tmp_path, "train:\n  learning_rat: 1e-4\n"))
    message = str(error.value)
    assert "train.learning_rat: unknown key; did you mean train.learning_rate?" in message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="optimizer: unknown key; valid keys: model, data, lora, train"):
        load_config(_write(tmp_path, "optimizer:\n  lr: 1\n"))


def test_all_errors_at_once(tmp_path):
    text = ("model:\n  prediction_type: noise\ndata:\n  resolution: 30\n  resoluton: 32\n"
            "train:\n  max_train_steps: ten\nvalidation:\n  guidance_scale: -2\n")
    with pytest.raises(ConfigError) as error:
        load_config(_write(tmp_path, text))
    problems = error.value.problems
    assert len(problems) == 5, problems
    joined = "\n".join(problems)
    assert "model.prediction_type: got 'noise'; allowed: 'epsilon', 'v_prediction', 'sample'" in joined
    assert "data.resolution: got 30; must be a multiple of 8" in joined
    assert "data.resoluton: unknown key" in joined
    assert "train.max_train_steps: got 'ten' (str); expected int" in joined
    assert "validation.guidance_scale: got -2.0; must be >= 0" in joined


@pytest.mark.parametrize("override,fragment", [
    ("train.learning_rate=0", "train.learning_rate: got 0.0; must be > 0"),
    ("train.train_batch_size=true", "train.train_batch_size: got True (bool); expected int"),
    ("data.caption_dropout=1.5", "data.caption_dropout: got 1.5; must be in [0, 1)"),
    ("model.block_out_channels=[32, 48]", "model.cross_attention_levels: got 3 entries"),
    ("model.norm_num_groups=7", "model.norm_num_groups: got 7"),
    ("data.source=webdataset", "data.path: required when data.source='webdataset'"),
    ("data.filters.max_pwatermark=2", "data.filters.max_pwatermark: got 2.0; must be a probability"),
    ("train.mixed_precision=fp8", "train.mixed_precision: got 'fp8'; allowed: 'no', 'bf16', 'fp16'"),
    ("validation.prompts=a red circle", "validation.prompts: got 'a red circle' (str); expected a list"),
    ("train.nope=1", "train.nope: unknown key"),
    ("model.norm_num_groups=0", "model.norm_num_groups: got 0; must be >= 1"),
    ("validation.prompts=[]", "validation.prompts: got []; give at least one non-empty prompt"),
    ("validation.num_inference_steps=2000", "more than model.num_train_timesteps=1000"),
    ("train.adam_beta2=1", "train.adam_beta2: got 1.0; must be in [0, 1)"),
    ("lora.enabled=true", "lora.enabled: adapters fine-tune a trained base; set model.pretrained_model_name_or_path"),
    ("lora.enabled=true", "model.train_text_encoder: a LoRA run keeps the base's weights frozen"),
    ("lora.rank=0", "lora.rank: got 0; must be >= 1"),
    ("lora.dropout=1", "lora.dropout: got 1.0; must be in [0, 1)"),
    ("lora.init=pissa", "lora.init: got 'pissa'; allowed: 'default', 'gaussian'"),
    ("lora.target_modules=[]", "lora.target_modules: got []; give at least one module name"),
    ("data.colors=[teal]", "data.colors: got ['teal']; give some of red, orange"),
    ("data.center_crop=false & data.cache=true", "random crops would be frozen; set data.center_crop: true"),
    ("train.noise_offset=-1", "train.noise_offset and train.input_perturbation must be >= 0"),
    ("data.filters.on_missing=skip", "data.filters.on_missing: got 'skip'; allowed: 'keep', 'drop'"),
    ("data.max_bad_fraction=2", "data.max_image_pixels must be >= 1 and data.max_bad_fraction in [0, 1]"),
    ("data.filters.max_caption_chars=0", "data.filters.max_caption_chars: got 0; must be >= 1"),
    ("data.persistent_workers=true", "data.persistent_workers: true needs data.num_workers >= 1"),
    ("data.streaming=true", "data.streaming / data.split: only data.source: hf reads them"),
    ("data.filters.min_caption_chars=10 & data.filters.max_caption_chars=5", "no caption could pass"),
    ("train.snr_gamma=0", "train.snr_gamma: got 0.0; must be > 0 or null"),
])
def test_bad_values_name_key_value_and_fix(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(None, override.split(" & "))
    assert fragment in str(error.value)


def test_overrides_apply_and_parse_yaml():
    config = load_config(ROOT / "configs" / "shapes.yaml", [
        "train.max_train_steps=7", "train.learning_rate=1e-4", "model.block_out_channels=[16, 32, 32]",
        "data.filters.min_width=10", "train.checkpoints_total_limit=null",
    ])
    assert config.train.max_train_steps == 7 and config.train.learning_rate == 1e-4
    assert config.model.block_out_channels == [16, 32, 32] and config.data.filters.min_width == 10
    assert config.train.checkpoints_total_limit is None


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["max_train_steps=3"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(ROOT / "configs" / "shapes.yaml", ["train.seed=5"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def _leaves(cls, prefix):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}.{f.name}")
        else:
            yield f"{prefix}.{f.name}"


def test_readme_documents_every_key():
    import dataclasses

    readme = (ROOT / "README.md").read_text()
    missing = [key for section in dataclasses.fields(Config) for key in _leaves(section.type, section.name)
               if f"`{key}`" not in readme]
    assert not missing


def test_readme_config_reference_is_up_to_date():
    """The README's reference is generated from the dataclasses' field docstrings; regenerate it with
    `python -m finetune.reference --write` after changing a field."""
    from finetune.config import TrainConfig
    from finetune.reference import field_docs, reference

    assert reference() in (ROOT / "README.md").read_text()
    assert field_docs(TrainConfig)["seed"] == "Seeds weights, data order, noise and timesteps."
    assert "| `train.seed` | 0 | Seeds weights, data order, noise and timesteps. |" in reference()


def test_a_text_field_takes_the_override_as_written():
    """YAML 1.1 reads `no` as false and `{000..009}` as a mapping; a string (or choice of strings) field takes the
    text as typed, as diffusers' `--mixed_precision no` does; in quotes, it is YAML's quoted string (the benchmarks
    wrote `train.mixed_precision='no'`, refused for two days)."""
    config = load_config(None, ["train.mixed_precision=no", "data.source=webdataset", "data.path=shards-{000..009}.tar",
                                "train.resume_from_checkpoint=null", "train.learning_rate=1e-4", "hub.revision=on"])
    assert config.train.mixed_precision == "no" and config.data.path == "shards-{000..009}.tar"
    assert config.train.resume_from_checkpoint is None and config.train.learning_rate == 1e-4
    assert config.hub.revision == "on"
    quoted = load_config(None, ["train.mixed_precision='no'", 'data.source="webdataset"', "data.path='a b.tar'"])
    assert (quoted.train.mixed_precision, quoted.data.source, quoted.data.path) == ("no", "webdataset", "a b.tar")
    as_written = ["'it''s'", "'a dog's photo'", '"C:\\new"', "'a': 'b'", "'", '"a\'']
    prefixes = [load_config(None, [f"data.caption_prefix={text}"]).data.caption_prefix for text in as_written]
    assert prefixes == ["it's", *as_written[1:]]
    with pytest.raises(ConfigError, match=r"override 'train.max_train_steps=\[1,': not a value YAML reads"):
        load_config(None, ["train.max_train_steps=[1,"])


def test_a_missing_config_file_lists_the_configs_beside_it(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"--config configs/shape.yaml: no such file; in configs: .*shapes.yaml"):
        load_config("configs/shape.yaml")
