"""What reaches the trackers: the config as hyperparameters without secrets or local paths (`tracker_settings`), and
one tiny training run logging to tensorboard, wandb, swanlab and mlflow at once, all offline, whose run files are
read back: every step's loss, the hyperparameters and (wandb, swanlab) the sample grid."""

import dataclasses
import glob
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from finetune.config import Config, HubConfig, load_config
from finetune.progress import tracker_settings

from . import launch
from .conftest import TINY_RUN
from .test_train import ROOT, TRAIN, _env

# ---- tracker_settings --------------------------------------------------------------------------


def _flat_names(config: Config) -> set[str]:
    return {f"{section}.{key}" + (f".{sub}" if sub else "")
            for section, values in dataclasses.asdict(config).items() for key, value in values.items()
            for sub in (value if isinstance(value, dict) else [None])}


def test_every_field_is_reported_and_local_paths_lose_their_folders(tmp_path):
    base = tmp_path / "home" / "alice" / "models" / "sd-base"
    base.mkdir(parents=True)
    config = load_config(None, [f"train.output_dir={tmp_path}/home/alice/outputs/shapes/",
                                f"train.resume_from_checkpoint={tmp_path}/home/alice/outputs/shapes/checkpoint-500",
                                f"model.pretrained_model_name_or_path={base}", "model.train_text_encoder=false",
                                f"model.pretrained_vae_model_name_or_path={tmp_path}/home/alice/models/vae-fix",
                                "data.source=parquet", f"data.path={tmp_path}/home/alice/data/*.parquet"])
    settings = tracker_settings(config)
    assert settings.keys() == _flat_names(config)  # nothing else left out (model.max_caption_tokens is no token)
    assert settings["train.output_dir"] == "shapes"
    assert settings["train.resume_from_checkpoint"] == "checkpoint-500"
    assert settings["model.pretrained_model_name_or_path"] == "sd-base"
    assert settings["model.pretrained_vae_model_name_or_path"] == "vae-fix"
    assert settings["data.path"] == "*.parquet"
    assert not any(str(tmp_path) in str(value) or "alice" in str(value) for value in settings.values())
    assert tracker_settings(load_config(None, ["train.resume_from_checkpoint=latest"])) \
        ["train.resume_from_checkpoint"] == "latest"


def test_hub_ids_stay_unless_a_local_folder_has_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = load_config(None, ["model.pretrained_model_name_or_path=someone/sd-base", "model.train_text_encoder=false",
                             "data.source=hf", "data.path=someone/pokemon-captions"])
    settings = tracker_settings(hub)
    assert settings["model.pretrained_model_name_or_path"] == "someone/sd-base"
    assert settings["data.path"] == "someone/pokemon-captions"
    (tmp_path / "someone" / "sd-base").mkdir(parents=True)  # now the loaders read this folder, not the Hub
    (tmp_path / "someone" / "pokemon-captions").mkdir()
    settings = tracker_settings(hub)
    assert settings["model.pretrained_model_name_or_path"] == "sd-base"
    assert settings["data.path"] == "pokemon-captions"
    local_only = tracker_settings(load_config(None, ["data.source=imagefolder", "data.path=someone/sd-base"]))
    assert local_only["data.path"] == "sd-base"  # an imagefolder is always a path


def test_urls_lose_their_credentials_and_pipe_commands_are_redacted():
    shards = ["https://alice:s3cret@data.example.com:8443/laion/{00000..00009}.tar?download=true&token=hf_abc",
              "https://bucket.s3.amazonaws.com/x/{0..3}.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1"
              "&X-Amz-Security-Token=FwoG&X-Amz-Signature=9f2e&X-Amz-Expires=3600",
              "s3://bucket/more-{0..3}.tar",
              "pipe:AWS_SECRET_ACCESS_KEY=wJalr aws s3 cp s3://bucket/x.tar -",
              "https://huggingface.co/datasets/someone/shards/resolve/main/{0..9}.tar"]
    config = load_config(None, ["data.source=webdataset", f"data.path={'::'.join(shards)}"])
    assert tracker_settings(config)["data.path"].split("::") == [
        "https://data.example.com:8443/laion/{00000..00009}.tar?download=true&token=REDACTED",
        "https://bucket.s3.amazonaws.com/x/{0..3}.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=REDACTED"
        "&X-Amz-Security-Token=REDACTED&X-Amz-Signature=REDACTED&X-Amz-Expires=3600",
        "s3://bucket/more-{0..3}.tar",  # remote URLs without credentials stay exactly as given
        "pipe:REDACTED",
        "https://huggingface.co/datasets/someone/shards/resolve/main/{0..9}.tar"]


def test_a_field_named_like_a_credential_is_left_out():
    config = Config()
    config.hub = dataclasses.make_dataclass("HubWithToken", [("hub_token", str, "hf_TestSecret0123"),
                                                             ("api_key", str, "sk-TestSecret0123")],
                                            bases=(HubConfig,))()
    settings = tracker_settings(config)
    assert "hub.hub_token" not in settings and "hub.api_key" not in settings
    assert "hub.hub_model_id" in settings
    assert not any("TestSecret" in str(value) for value in settings.values())


# ---- offline runs ------------------------------------------------------------------------------


def _log_records(path: Path) -> list[bytes]:
    """The records of a wandb `.wandb` or swanlab `.swanlab` run file: both are LevelDB logs
    (github.com/google/leveldb/blob/main/doc/log_format.md) after a 7-byte file header: 32 KiB blocks of chunks,
    each a 7-byte header (CRC-32 seeded with the type, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data, offset, records, record = path.read_bytes(), 7, [], b""
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:  # too little of the block left for a header: padding
            offset += 32768 - offset % 32768
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk = data[offset + 7:offset + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: corrupt record at {offset}"
        record, offset = record + chunk, offset + 7 + length
        if kind in (1, 4):
            records.append(record)
            record = b""
    return records


def _wandb_run(folder: Path) -> tuple[dict, dict, list[str]]:
    """Losses by step, the config and the logged image files of the one offline run under `folder`."""
    from wandb.proto.wandb_internal_pb2 import Record

    [run] = glob.glob(f"{folder}/wandb/offline-run-*/")
    losses, config = {}, {}
    for data in _log_records(next(Path(run).glob("run-*.wandb"))):
        record = Record.FromString(data)
        if record.HasField("history"):  # (a key is `key`, or `nested_key` when it may have parts)
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "loss" in items:
                losses[record.history.step.num] = items["loss"]
        if record.HasField("config"):
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.config.update})
    images = Path(run) / "files" / "media" / "images"
    return losses, config, [str(p.relative_to(images)).rsplit("_", 2)[0] for p in images.rglob("*.png")]


def _swanlab_run(folder: Path) -> tuple[dict, dict, list[str]]:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record

    [run] = glob.glob(f"{folder}/run-*/")
    losses, images = {}, []
    for data in _log_records(next(Path(run).glob("run-*.swanlab"))):
        record = Record.FromString(data)
        if record.HasField("scalar") and record.scalar.key == "loss":
            losses[record.scalar.step] = record.scalar.value.number
        if record.HasField("media"):
            images.append(record.media.key)
    config = yaml.safe_load((Path(run) / "files" / "config.yaml").read_text())
    return losses, {key: entry["value"] for key, entry in config.items()}, images


def _mlflow_run(folder: Path) -> tuple[dict, dict]:
    [run] = glob.glob(f"{folder}/*/*/metrics/loss")
    run = Path(run).parent.parent
    losses = {int(step): float(value) for _, value, step in
              (line.split() for line in (run / "metrics" / "loss").read_text().splitlines())}
    return losses, {p.name: p.read_text() for p in (run / "params").iterdir()}


def _tensorboard_losses(logs: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in logs.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events)).Reload()
        if "loss" in accumulator.Tags()["scalars"]:
            losses.update({event.step: event.value for event in accumulator.Scalars("loss")})
    return losses


def test_one_run_logs_to_wandb_swanlab_and_mlflow_offline(tmp_path):
    """`train.report_to=tensorboard,wandb,swanlab,mlflow` with each tracker offline (no account, no network): every
    step's loss reaches each of them (float32 in tensorboard), the hyperparameters are `tracker_settings` (the
    output folder by its last part), and wandb and swanlab get the sample grid and the process strips."""
    out = tmp_path / "run"
    overrides = ["train.report_to=tensorboard,wandb,swanlab,mlflow", "train.max_train_steps=3",
                 f"train.output_dir={out}"]
    env = _env(tmp_path, {"HOME": str(tmp_path / "home"), "DO_NOT_TRACK": "1",
                          "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                          "SWANLAB_MODE": "offline", "SWANLAB_LOG_DIR": str(tmp_path / "swanlog"),
                          "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"})
    result = launch.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"), *TINY_RUN,
                         *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    settings = tracker_settings(load_config(ROOT / "configs" / "shapes.yaml", [*TINY_RUN, *overrides]))

    wandb_losses, wandb_config, wandb_images = _wandb_run(tmp_path)
    swanlab_losses, swanlab_config, swanlab_images = _swanlab_run(tmp_path / "swanlog")
    mlflow_losses, mlflow_params = _mlflow_run(tmp_path / "mlruns")
    assert sorted(wandb_losses) == [1, 2, 3]
    assert swanlab_losses == mlflow_losses == wandb_losses
    assert _tensorboard_losses(out / "logs") == pytest.approx(wandb_losses, rel=1e-6)
    for config in (wandb_config, swanlab_config):
        assert {key: config[key] for key in settings} == settings
    assert mlflow_params == {key: str(value) for key, value in settings.items()}  # mlflow keeps strings
    assert wandb_config["train.output_dir"] == swanlab_config["train.output_dir"] == mlflow_params["train.output_dir"] \
        == "run"
    assert not any(str(tmp_path) in str(value) for config in (wandb_config, swanlab_config, mlflow_params)
                   for value in config.values())
    assert sorted(wandb_images) == sorted(swanlab_images) == ["process/forward", "process/reverse", "validation"]
