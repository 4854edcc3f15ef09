"""The trainer's command line: `--config FILE`, `section.key=value` overrides and a few flags, with the habits of
diffusers' training scripts understood: `--learning_rate 1e-4` is answered with the override to write
(`train.learning_rate=1e-4`), and a config file given without `--config` is pointed at it."""

import argparse
import dataclasses
import difflib
import json
import shlex
import sys
import typing

from .cli import ToolParser, UserError
from .config import Config

# diffusers' example flags whose setting here has another name (the rest are found by their own name).
DIFFUSERS_NAMES = {
    "seed": ["train.seed"],
    "revision": ["model.revision"],
    "validation_prompt": ["validation.prompts=[{}]"],
    "validation_prompts": ["validation.prompts=[{}]"],
    "num_validation_images": ["validation.num_images_per_prompt"],
    "dataset_name": ["data.source=hf", "data.path"],
    "train_data_dir": ["data.source=imagefolder", "data.path"],
    "use_ema": ["train.use_ema"],
    "num_train_epochs": ["train.max_train_steps"],
    "lr_scheduler": ["train.lr_scheduler"],
    "hub_token": [],  # answered below: a token never goes on the command line
}
PROG = "accelerate launch finetune/train.py"


def parser() -> ToolParser:
    tool = ToolParser(prog=PROG, description=__doc__,
                      epilog="Settings: section.key=value (python -m finetune.reference lists every key).")
    tool.add_argument("--config", help="a YAML run config (configs/*.yaml); omitted: the defaults")
    tool.add_argument("--dry-run", action="store_true",
                      help="check everything a run needs (config, base, data, resume target, output folder), build "
                           "the models, print a summary and exit")
    tool.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    tool.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_train_steps=100")
    return tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; a diffusers-style flag or a config file without --config is a UserError that
    says what to write instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    tool = parser()
    problems = _stray_flags(tool, argv)
    if problems:
        raise UserError("; ".join(problems))
    args = tool.parse_intermixed_args(argv)  # flags may come after overrides
    files = [item for item in args.overrides if "=" not in item and item.endswith((".yaml", ".yml"))]
    if files:
        raise UserError(f"{files[0]}: a config file is given with --config: --config {files[0]}"
                        + (" (one config per run)" if args.config or len(files) > 1 else ""))
    return args


def config_keys() -> dict[str, list[str]]:
    """Every setting's leaf name -> its dotted keys (`seed` -> train.seed, validation.seed)."""
    keys: dict[str, list[str]] = {}
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(typing.get_type_hints(Config)[section.name]):
            keys.setdefault(field.name, []).append(f"{section.name}.{field.name}")
    return keys


def _stray_flags(tool: ToolParser, argv: list[str]) -> list[str]:
    """What to write instead of each `--name [value]` that is not one of the trainer's flags."""
    known, keys, problems = set(tool._option_string_actions), config_keys(), []
    dashed = tool._dashed(argv)
    for i, item in enumerate(dashed):
        name, sep, value = item.partition("=")
        if not name.startswith("--") or name in known or name == "--":
            continue
        if not sep and i + 1 < len(dashed) and not dashed[i + 1].startswith("--") and "=" not in dashed[i + 1]:
            value = dashed[i + 1]
        problems.append(_answer(name[2:].replace("-", "_"), value, keys))
    return problems


def _answer(name: str, value: str, keys: dict[str, list[str]]) -> str:
    """The override(s) to write for diffusers-style `--name value`."""
    flag = f"--{name}{' ' + value if value else ''}"
    if name == "hub_token":
        return f"{flag}: a token is not given on the command line; log in once with `hf auth login` (or set HF_TOKEN)"
    targets = DIFFUSERS_NAMES.get(name) or keys.get(name) or ([name] if "." in name else [])
    if name == "num_train_epochs":
        return f"{flag}: runs are measured in steps here; write train.max_train_steps=N"
    if targets:
        written = [shlex.quote(t.format(json.dumps(value)) if "=" in t else f"{t}={value or '...'}") for t in targets]
        joiner = " and " if name in ("dataset_name", "train_data_dir") else " or "
        return f"{flag}: settings are section.key=value here; write {joiner.join(written)}"
    close = difflib.get_close_matches(name, list(keys), n=1)
    hint = f"did you mean {' or '.join(keys[close[0]])}=...? " if close else ""
    return (f"{flag}: not an option of the trainer; {hint}its flags are --config, --dry-run, --print-config, --debug, "
            "and settings are section.key=value (python -m finetune.reference lists them)")
