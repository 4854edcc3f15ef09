"""`--dry-run`: check, in seconds and without writing anything, what a run would otherwise find out later: the
output folder (writable, not in use by another run), the resume target (there, complete, written by as many
processes), the base (a local folder, in the cache, or to be downloaded: then the dry run stops rather than
download it), and the data (one sample read through decoding, filters, transforms and the tokenizer)."""

import os
from pathlib import Path

import braceexpand
from accelerate import Accelerator

from . import sharding, single_file
from .bases import locate_base
from .checkpointing import changed_settings, list_checkpoints, resume_target
from .cli import UserError
from .config import Config, config_yaml
from .data.mixing import entries
from .output_lock import held_by, in_use


def check_ahead(config: Config, accelerator: Accelerator) -> bool:
    """Check the output folder, the resume target and the base, printing a line for each (main process); False
    when the base would be downloaded (or a single-file base converted), so the dry run stops before it is."""
    lines = [check_output(config.train.output_dir),
             check_resume(config, accelerator.num_processes, sharding.is_sharded(accelerator))]
    base, converted = config.model.pretrained_model_name_or_path, True
    if single_file.is_single_file(base):
        line, converted = check_single_file(base, config.model.single_file_config)
        lines.append(line)
        base = None
    where = locate_base(base, config.model.revision) if base else None
    if base:
        lines.append(f"base: {base}: " + {"local": "a local pipeline folder", "cache": "in the local Hugging Face "
                                          "cache", "hub": "on the Hub, not in the local cache: a run downloads it "
                                          "first; the dry run stops here rather than download it"}[where])
    sections = [section for section, _ in entries(config.data)] if config.data.sources else [config.data]
    lines += [check_shards(section.path) for section in sections if section.source == "webdataset"]
    if accelerator.is_main_process:
        print("\n".join(line for line in lines if line))
    return where != "hub" and converted


def check_single_file(path: str, config_folder: str | None) -> tuple[str, bool]:
    """A single-file base: readable safetensors of a known family (or with its config folder); and whether it was
    converted before (else a run converts it first, which the dry run does not: it writes the cache)."""
    _, keys, _ = single_file.read_keys(path)
    single_file.check_config_folder(config_folder)
    kind = f"configs from {config_folder}" if config_folder else {
        "sd15": "SD-1.x", "sdxl": "SDXL"}[single_file.family(keys, path)] + ", configs shipped with this package"
    folder = single_file.conversion(path, config_folder)
    converted = (folder / single_file.COMPLETE).is_file()
    state = (f"converted before, into {folder}" if converted else "not converted yet: a run converts it into a "
             "diffusers folder in the cache first; the dry run stops here rather than write it")
    return f"base: {path}: a single-file checkpoint ({len(keys)} tensors; {kind}); {state}", converted


def check_shards(pattern: str | None) -> str | None:
    """Which local shards of a webdataset pattern are missing: all of them is an error, some a line."""
    shards = [s for part in (pattern or "").split("::") for s in braceexpand.braceexpand(part)]
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not Path(s).is_file()]
    if local and len(missing) == len(local):
        raise UserError(f"data.path={pattern}: none of its {len(local)} shard(s) exists (the first is {local[0]}); "
                        "check the path and the brace pattern, e.g. shards/{00000..00009}.tar")
    if missing:
        return f"data: {len(missing)} of {len(local)} local shards missing (first {missing[0]}); a run skips them"
    return f"data: {len(local)} local shard(s) there" + (f", {len(shards) - len(local)} remote" if len(shards) >
                                                          len(local) else "") if shards else None


def check_output(output_dir: str) -> str:
    """Writable and not held by a run; what is there already."""
    holder = held_by(output_dir) if Path(output_dir).is_dir() else None
    if holder:
        raise in_use(output_dir, holder)
    existing = next(p for p in [Path(output_dir).absolute(), *Path(output_dir).absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"train.output_dir={output_dir}: {existing} is not a folder this user can write to; choose "
                        "another train.output_dir")
    if existing != Path(output_dir).absolute():
        return f"output: {output_dir} (would be created in {existing}), writable"
    checkpoints = [p.name for p in list_checkpoints(output_dir)]
    return f"output: {output_dir} (exists{', holds ' + ', '.join(checkpoints) if checkpoints else ''}), writable, " \
           "not in use"


def check_resume(config: Config, num_processes: int, sharded: bool = False) -> str | None:
    """The checkpoint a run would resume from, checked whole; the settings changed since."""
    if not config.train.resume_from_checkpoint:
        return None
    path, manifest = resume_target(config.train, num_processes, sharded)
    if path is None:
        return "resume: latest: no checkpoint yet, a run starts fresh"
    changed = changed_settings(path, config_yaml(config))
    return f"resume: {path} at step {manifest['step']}, complete" + (
        f"; changed since: {'; '.join(changed)}" if changed else "")


def read_one(dataset, accelerator: Accelerator) -> None:
    """Read this process's first training example through the whole data path and print what came out."""
    dataset.set_epoch(0)
    example = next(iter(dataset), None)
    counts = {k: v for k, v in dataset.counts.items() if v}
    if example is None:
        raise UserError(f"data: no usable sample could be read ({counts or 'the source is empty'}); check data.path "
                        "and data.filters")
    if accelerator.is_main_process:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in example.items() if hasattr(v, "shape"))
        print(f"data: read a sample through decoding, filters, transforms and the tokenizer ({shapes}); counts so "
              f"far {counts}")
        print("dry run: everything checked; nothing written to the output folder")
