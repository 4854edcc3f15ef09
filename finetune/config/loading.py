"""The whole run's Config with its checks across sections, read from YAML with dotted overrides and written back."""

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .building import _build
from .data import DataConfig, held_out_section
from .errors import ConfigError, _check
from .model import LoraConfig, ModelConfig, TextualInversionConfig
from .train import PriorConfig, TrainConfig
from .validation import HubConfig, ValidationConfig


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)

    def __post_init__(self):
        problems = []
        if self.textual_inversion.enabled and (not self.model.pretrained_model_name_or_path
                                               or self.model.train_text_encoder):
            problems.append("textual_inversion.placeholder_tokens: new tokens are learnt for a base's frozen text "
                            "encoder; set model.pretrained_model_name_or_path and model.train_text_encoder: false")
        if self.textual_inversion.train_fraction < 1 and (not self.lora.enabled or self.train.optimizer not in (
                "adamw", "prodigy") or self.train.use_8bit_adam or self.train.optimizer_cpu_offload):
            problems.append("textual_inversion.train_fraction below 1 is pivotal tuning's: it needs lora.enabled: true "
                            "and train.optimizer adamw or prodigy (without use_8bit_adam or optimizer_cpu_offload), "
                            "whose state counts the steps")
        if self.textual_inversion.enabled and (self.train.optimizer == "adamw_schedulefree"
                                               or self.train.optimizer_cpu_offload):
            problems.append("train.optimizer: textual inversion puts the base's rows back after every step, which "
                            "adamw_schedulefree's averaged weights and optimizer_cpu_offload's wrapper do not see; use "
                            "adamw, prodigy, adafactor or sgd, without optimizer_cpu_offload")
        if self.textual_inversion.enabled and self.hub.push_to_hub:
            problems.append("hub.push_to_hub: the model card does not describe textual-inversion embeddings yet; set "
                            "it to false and share <token>.safetensors with `hf upload`")
        if self.lora.enabled and self.lora.type in ("loha", "lokr") and self.hub.push_to_hub:
            problems.append(f"hub.push_to_hub: {self.lora.type} adapters load in ComfyUI, AUTOMATIC1111 and Forge, not "
                            "in stock diffusers, so the model card's code would not work; set it to false and share "
                            "lora_kohya.safetensors with `hf upload`")
        if self.textual_inversion.enabled and not self.lora.enabled and self.train.use_ema:
            problems.append("train.use_ema: textual inversion alone keeps no EMA of its embeddings; set it to false")
        if self.prior.mode != "none" and not self.model.pretrained_model_name_or_path:
            problems.append(f"prior.mode: {self.prior.mode} keeps what a base draws for the class; fine-tune a base "
                            "(model.pretrained_model_name_or_path), or set prior.mode: none")
        if self.prior.mode == "class_images" and self.model.pretrained_model_name_or_path:
            from ..prior import with_class_images  # (it imports this module)

            try:  # the data with the class images added is checked now, not after they are drawn
                with_class_images(self.data, Path("class-images"), self.prior, None)
            except ConfigError as error:
                problems.extend(error.problems)
        masks = self.data.masks or any(entry.get("masks") for entry in self.data.sources)
        if self.prior.mode == "base_prediction" and (not self.lora.enabled or self.lora.train_text_encoder
                                                     or masks):
            problems.append("prior.mode: base_prediction takes the base's prediction with the UNet's adapters off, "
                            "so it needs lora.enabled: true, a frozen text encoder (lora.train_text_encoder: false) "
                            "and no data.masks; or use prior.mode: class_images")
        if self.validation.num_inference_steps > self.model.num_train_timesteps:
            problems.append(f"validation.num_inference_steps: got {self.validation.num_inference_steps}, more than "
                            f"model.num_train_timesteps={self.model.num_train_timesteps}; use at most that many")
        if self.lora.enabled and self.model.train_text_encoder:
            problems.append("model.train_text_encoder: a LoRA run keeps the base's weights frozen; set it to false "
                            "(lora.train_text_encoder: true puts adapters on the text encoder instead)")
        if self.lora.enabled and not self.model.pretrained_model_name_or_path:
            problems.append("lora.enabled: adapters fine-tune a trained base; set model.pretrained_model_name_or_path "
                            "(e.g. outputs/shapes, written by configs/shapes.yaml)")
        if self.model.base_quantization != "none" and not self.lora.enabled:
            problems.append(f"model.base_quantization: {self.model.base_quantization} quantizes a frozen base, which "
                            "only a LoRA run has; set lora.enabled: true, or base_quantization: none")
        if self.model.base_quantization == "nf4" and self.lora.type in ("loha", "lokr"):
            problems.append(f"model.base_quantization: nf4 cannot carry lora.type: {self.lora.type} (peft sizes its "
                            "factors from the packed 4-bit weights); use int8 or fp8, or lora.type: lora")
        if self.validation.loss_data:
            try:
                held_out = held_out_section(self.data, self.validation.loss_data)
                if self.data.sources:
                    from ..data.mixing import entries  # (the data package imports this module)

                    sections = [section for section, _ in entries(self.data)]
                else:
                    sections = [self.data]
                if any(s.source != "builtin" and all(getattr(held_out, f) == getattr(s, f)
                                                     for f in ("source", "path", "split")) for s in sections):
                    problems.append("validation.loss_data: it names the training data itself (the same source, path "
                                    "and split); name held-out pairs, e.g. {path: val/{000000..000001}.tar}")
            except ConfigError as error:
                problems.extend(error.problems)
        if self.validation.loss_samples and (self.data.source != "builtin" or self.data.sources) \
                and not self.validation.loss_data:
            problems.append("validation.loss_samples: with your own data, name the held-out pairs in "
                            "validation.loss_data (e.g. {path: val/{000000..000001}.tar}); the run's own data would "
                            "not be held out")
        if self.train.export_single_file and (self.lora.enabled or not self.model.pretrained_model_name_or_path):
            problems.append("train.export_single_file: only a full fine-tune of an SD-1.x or SDXL base has a "
                            "single-file form (a LoRA run writes lora_kohya.safetensors, which those tools load); "
                            "set it to false" + ("" if self.lora.enabled else
                                                 ", or fine-tune a base (model.pretrained_model_name_or_path)"))
        _check(problems)


def _field_type(parts: list[str]) -> Any:
    """The annotation of the config field at `parts` (e.g. ["train", "mixed_precision"]), or None if there is none."""
    tp = Config
    for part in parts:
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _parse_override(text: str, tp: Any) -> Any:
    """A value typed on the command line: YAML (`1e-4`, `true`, `[32, 64]`, `null`), except for a text field (a
    string, or a choice of strings), which takes the text as written: `train.mixed_precision=no` is "no", not YAML
    1.1's false, and `data.path=shards-{000..009}.tar` is a path, not a mapping. Text in matching quotes loses them
    as in a config file (`train.mixed_precision='no'` is "no" too; `'it''s'` is "it's"), unless YAML would read
    more into it: a backslash escape in double quotes (`"C:\new"` stays as written), or quotes that do not enclose
    the whole text (`'a dog's photo'`)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    inner = [a for a in args if a is not type(None)]
    text_field = len(inner) == 1 and (inner[0] is str or typing.get_origin(inner[0]) is Literal
                                      and all(isinstance(a, str) for a in typing.get_args(inner[0])))
    if text_field and not (type(None) in args and text.strip() in ("null", "~", "")):
        if len(text) >= 2 and text[0] == text[-1] and (text[0] == "'" or text[0] == '"' and "\\" not in text):
            try:
                unquoted = yaml.safe_load(text)
            except yaml.YAMLError:
                return text
            return unquoted if isinstance(unquoted, str) else text
        return text
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides, each value read for its field's type (`_parse_override`)."""
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep or "." not in dotted:
            raise ConfigError([f"override {item!r}: expected section.key=value, e.g. train.max_train_steps=100"])
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {part} is not a section"])
        try:
            node[leaf] = _parse_override(text, _field_type([*parents, leaf]))
        except yaml.YAMLError as error:
            problem = str(error).splitlines()[0]
            raise ConfigError([f"override {item!r}: not a value YAML reads ({problem}); e.g. {dotted}=[1, 2] for a "
                               "list, or quote text"]) from None
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate everything."""
    raw = {}
    if path is not None and not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        there = sorted(n for n in os.listdir(folder) if n.endswith((".yaml", ".yml"))) if os.path.isdir(folder) else []
        raise ConfigError([f"--config {path}: no such file" + (f"; in {folder}: {', '.join(there)}" if there else "")])
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    raw = apply_overrides(raw, list(overrides))
    if isinstance(raw.get("data"), dict) and raw["data"].get("kohya_toml"):
        from ..data.kohya_toml import expand  # (the data package imports this module)

        raw = expand(raw)
    problems: list[str] = []
    config = _build(Config, raw, "", problems)
    _check(problems)
    return config


def config_yaml(config: Config) -> str:
    """The resolved config as YAML text; it loads back to an equal Config."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (`config_yaml`) to `path`."""
    with open(path, "w") as f:
        f.write(config_yaml(config))
