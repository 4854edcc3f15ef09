"""Resumable checkpoints: written whole or not at all, rotated only after the new one is complete.

A checkpoint is `output_dir/checkpoint-<step>/`: accelerate's state (weights in safetensors; the optimizer's and
LR scheduler's state in torch's format, which accelerate reads back with `weights_only=True`), the EMA and each
process's random number generators in safetensors, and `manifest.json`, written last. Nothing in it is a pickle
that loading could execute. It is assembled in a temporary folder and renamed into place, so a crash leaves no half
checkpoint under a real name.
"""

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors import safe_open
from safetensors.torch import save_file

from . import sharding
from .cli import UserError
from .config import TrainConfig

logger = get_logger("finetune")

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
_NAME = re.compile(r"^checkpoint-(\d+)$")
EMA = "ema_{}.safetensors"
RNG = "rng_state_{}.safetensors"
ACCELERATE_RNG = "random_states_{}.pkl"  # accelerate's pickle of the same states, removed once ours is written
# What accelerate writes with torch.save and reads back with weights_only=True (tensors and plain values only).
_TORCH_FORMAT = re.compile(r"^(optimizer|scheduler|sampler)(_\d+)?\.bin$|^scaler\.pt$")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with a manifest) in `output_dir`, oldest first."""
    folder = Path(output_dir)
    found = [p for p in folder.glob("checkpoint-*") if _NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str | os.PathLike) -> Path | None:
    """The folder to resume from: `latest` is the newest complete checkpoint (None if there is none); a bare
    `checkpoint-N` that is not a folder here is the one in `output_dir`."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and len(path.parts) == 1 and (Path(output_dir) / path).is_dir():
        path = Path(output_dir) / path  # `checkpoint-1000`: in train.output_dir, as diffusers' scripts read it
    if not path.is_dir():
        found = [p.name for p in list_checkpoints(output_dir)]
        raise UserError(f"train.resume_from_checkpoint={resume_from_checkpoint!r}: no such folder, nor in "
                        f"train.output_dir={str(output_dir)!r}"
                        + (f" (it has {', '.join(found)}; or use `latest`)" if found else
                           " (which has no checkpoints yet); use `latest` to start fresh when there is none"))
    if not (path / MANIFEST).is_file():
        raise UserError(
            f"train.resume_from_checkpoint={resume_from_checkpoint!r} has no {MANIFEST}, so it was not written "
            "completely; resume from an earlier checkpoint or use `latest`"
        )
    return path


def read_data_state(path: str | os.PathLike, rank: int) -> dict:
    """Where process `rank`'s data stream was when the checkpoint was written."""
    with open(Path(path) / f"data_state_{rank}.json") as f:
        return json.load(f)


def read_manifest(path: str | os.PathLike, world_size: int | None = None, sharded: bool | None = None) -> dict:
    """The checkpoint's manifest, after checking that every file it lists is there with the size it was written
    with and, when `world_size` is given, that it was written by as many processes (each has its own RNG
    state), and when `sharded` is given, by the same engine (FSDP's shards, or whole weights)."""
    path = Path(path)
    with open(path / MANIFEST) as f:
        manifest = json.load(f)
    pickles = [p.name for p in sorted(path.iterdir())
               if p.suffix in _PICKLE_SUFFIXES and not _TORCH_FORMAT.match(p.name)]
    if pickles:
        raise UserError(f"checkpoint {path} holds {', '.join(pickles)}: pickle files this trainer does not write "
                         "(an earlier version pickled the EMA and the random states), and loading a pickle can run "
                         "code. Resume from a checkpoint written by this version, or start afresh")
    missing = [name for name in manifest["files"] if not (path / name).exists()]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}; resume from "
                                "another checkpoint")
    for name, size in manifest.get("sizes", {}).items():
        if (path / name).stat().st_size != size:
            raise UserError(f"checkpoint {path} is damaged: {name} is {(path / name).stat().st_size} bytes but was "
                             f"written with {size}; resume from another checkpoint")
    if sharded is not None and manifest.get("sharded", False) != sharded:
        raise UserError(f"checkpoint {path} was written {'sharded (FSDP)' if manifest.get('sharded') else 'unsharded'} "
                        f"but this run is {'sharded' if sharded else 'not'}; resume it with the engine that wrote it "
                        "(the accelerate config's distributed_type)")
    if world_size is not None and manifest["world_size"] != world_size:
        raise UserError(f"checkpoint {path} was written by {manifest['world_size']} processes but this run has "
                         f"{world_size}; resume with --num_processes {manifest['world_size']} for an exact "
                         "continuation")
    return manifest


def resume_target(train: TrainConfig, world_size: int, sharded: bool) -> tuple[Path | None, dict | None]:
    """The checkpoint `train.resume_from_checkpoint` names and its manifest, checked whole before anything is built
    (None, None: no resume, or `latest` with no checkpoint yet)."""
    path = resolve_checkpoint(train.resume_from_checkpoint, train.output_dir) if train.resume_from_checkpoint else None
    return (path, read_manifest(path, world_size, sharded)) if path else (None, None)


def resume(accelerator: Accelerator, train: TrainConfig, config_text: str,
           emas: list) -> tuple[int, int, int, Path | None]:
    """Restore the state of `train.resume_from_checkpoint`, if any: (step, epoch, batches seen in that epoch,
    the checkpoint folder). Settings changed since the checkpoint are named: the continuation is exact only
    when none that shape training changed."""
    if not train.resume_from_checkpoint:
        return 0, 0, 0, None
    path = resolve_checkpoint(train.resume_from_checkpoint, train.output_dir)
    if path is None:
        logger.info("train.resume_from_checkpoint=latest: no checkpoint yet, starting fresh", main_process_only=True)
        return 0, 0, 0, None
    manifest = read_manifest(path, accelerator.num_processes, sharding.is_sharded(accelerator))
    if sharding.is_sharded(accelerator):
        sharding.load_state(accelerator, path, emas)
    else:
        accelerator.load_state(str(path))
    load_rng_state(path / RNG.format(accelerator.process_index))
    data = read_data_state(path, accelerator.process_index)
    logger.info(f"resumed from {path} at step {manifest['step']}", main_process_only=True)
    changed = changed_settings(path, config_text)
    if manifest.get("mixed_precision", accelerator.mixed_precision) != accelerator.mixed_precision:
        changed.append(f"precision in effect: {manifest['mixed_precision']} -> {accelerator.mixed_precision} "
                       "(train.mixed_precision: auto chose differently on this machine)")
    if changed:
        logger.warning(f"settings changed since {path.name}: {'; '.join(changed)}", main_process_only=True)
    return manifest["step"], data["epoch"], data["batches_in_epoch"], path


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, step: int, data_state: dict,
                    total_limit: int | None = None, keep: Path | None = None, config_text: str = "",
                    emas: list = ()) -> Path:
    """Save the full training state as `checkpoint-<step>` atomically, then rotate old checkpoints, never
    removing `keep` (the one this run resumed from). Every process must call it, with its own `data_state`
    (where its part of the data stream is), which goes to `data_state_<rank>.json`. `config_text`, the run's
    resolved config, is kept beside the state and its SHA-256 in the manifest. Under FSDP each process writes its
    shards (`sharding.save_state`, the EMAs `emas` included) instead of accelerate's state."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    if sharding.is_sharded(accelerator):
        tmp.mkdir(parents=True, exist_ok=True)
        sharding.save_state(accelerator, tmp, emas)
    else:
        accelerator.save_state(str(tmp))
    save_rng_state(tmp / RNG.format(accelerator.process_index))
    (tmp / ACCELERATE_RNG.format(accelerator.process_index)).unlink(missing_ok=True)
    with open(tmp / f"data_state_{accelerator.process_index}.json", "w") as f:
        json.dump(data_state, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CONFIG).write_text(config_text)
        manifest = {"step": step, "world_size": accelerator.num_processes, "sharded": sharding.is_sharded(accelerator),
                    "mixed_precision": accelerator.mixed_precision,  # what `auto` resolved to
                    "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
                    "files": sorted(p.name for p in tmp.iterdir()),
                    "sizes": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            old = [p for p in list_checkpoints(output_dir) if p != final and p != keep]
            for path in old[: max(0, len(old) - (total_limit - 1))]:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


def changed_settings(path: str | os.PathLike, config_text: str) -> list[str]:
    """`section.key: old -> new` for every setting of the config at `path` (a checkpoint) that differs in
    `config_text`, leaving out where the run is and how it resumes."""
    saved = Path(path) / CONFIG
    if not saved.is_file():
        return []
    old, new = _flatten(yaml.safe_load(saved.read_text())), _flatten(yaml.safe_load(config_text))
    ignored = {"train.output_dir", "train.resume_from_checkpoint"}
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if key not in ignored and old.get(key) != new.get(key)]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_rng_state(path: Path) -> None:
    """This process's random number generators (Python's, numpy's, torch's CPU and CUDA ones: what accelerate
    saves) as tensors, with their few scalars in the metadata."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"python": torch.tensor(py_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np_keys.astype(np.int64)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python": [py_version, py_gauss], "numpy": [np_kind, np_pos, np_has_gauss, np_gauss]}
    save_file(tensors, str(path), metadata={"state": json.dumps(scalars)})  # one key: the same state, the same bytes


def load_rng_state(path: Path) -> None:
    """Restore what `save_rng_state` wrote."""
    with safe_open(str(path), framework="pt") as f:
        tensors, scalars = {key: f.get_tensor(key) for key in f.keys()}, json.loads(f.metadata()["state"])
    py_version, py_gauss = scalars["python"]
    np_kind, np_pos, np_has_gauss, np_gauss = scalars["numpy"]
    random.setstate((py_version, tuple(tensors["python"].tolist()), py_gauss))
    np.random.set_state((np_kind, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


class EmaCheckpoints:
    """accelerate save/load hooks that keep each EMA in `ema_<i>.safetensors`: its averaged weights as tensors, its
    counters in the metadata. (`register_for_checkpointing` would pickle it, and accelerate loads that pickle with
    `weights_only=False`.)"""

    def __init__(self, accelerator: Accelerator, emas: list):
        self.accelerator, self.emas = accelerator, emas
        accelerator.register_save_state_pre_hook(self.save)
        accelerator.register_load_state_pre_hook(self.load)

    def save(self, models: list, weights: list, output_dir: str) -> None:
        if not self.accelerator.is_main_process:
            return
        for i, ema in enumerate(self.emas):
            state = ema.state_dict()
            shadows = {f"shadow.{j}": p.detach().cpu().contiguous() for j, p in enumerate(state.pop("shadow_params"))}
            save_file(shadows, str(Path(output_dir) / EMA.format(i)), metadata={"state": json.dumps(state)})

    def load(self, models: list, input_dir: str) -> None:
        for i, ema in enumerate(self.emas):
            device = ema.shadow_params[0].device  # where its weights are; the file loads onto the CPU
            with safe_open(str(Path(input_dir) / EMA.format(i)), framework="pt") as f:
                state = json.loads(f.metadata()["state"])
                state["shadow_params"] = [f.get_tensor(f"shadow.{j}") for j in range(len(f.keys()))]
            ema.load_state_dict(state)
            ema.to(device)


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a complete checkpoint: its manifest is written last."""
    return (Path(folder) / MANIFEST).is_file()


def trained_model_count(path: str | os.PathLike) -> int:
    """How many trained models the checkpoint holds weights of (whole, or as FSDP shards)."""
    path = Path(path)
    return len(list(path.glob("model*.safetensors")) or list(path.glob(sharding.SHARD.format(rank=0, part="model_*"))))


def model_weights(path: str | os.PathLike, index: int) -> dict[str, torch.Tensor]:
    """The weights accelerate saved for the `index`-th trained model (`model.safetensors`, `model_1.safetensors`, ...),
    named as the model itself names them (a `module.` in front, as DDP's wrapper names them, is removed; accelerate
    saves the module inside the wrapper, so its checkpoints have none); of a sharded run, its shards stitched whole."""
    if sharding.is_sharded_checkpoint(Path(path)):
        return sharding.stitch(Path(path), f"model_{index}")
    with safe_open(str(Path(path) / f"model{f'_{index}' if index else ''}.safetensors"), framework="pt") as f:
        return {key.removeprefix("module."): f.get_tensor(key) for key in f.keys()}


def ema_weights(path: str | os.PathLike, index: int) -> list[torch.Tensor] | None:
    """The averaged weights of EMA `index` as `EmaCheckpoints` saved them (in the order of its model's trainable
    weights), or None when the checkpoint has none."""
    if sharding.is_sharded_checkpoint(Path(path)):
        if not (Path(path) / sharding.SHARD.format(rank=0, part=f"ema_{index}")).is_file():
            return None
        shadows = sharding.stitch(Path(path), f"ema_{index}")
        return [shadows[f"shadow.{j}"] for j in range(len(shadows))]
    file = Path(path) / EMA.format(index)
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as f:
        return [f.get_tensor(f"shadow.{j}") for j in range(len(f.keys()))]
