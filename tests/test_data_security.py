"""A dataset cannot make training read files outside it or run commands: image paths that leave the dataset's
folder are skipped and counted (unless data.allow_outside_paths), `pipe:` shards are refused (unless
data.allow_pipe_urls)."""

import io
import json
import logging
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from finetune.config import ConfigError, DataConfig
from finetune.data import ImageTextStream, build_source
from finetune.models import build_tokenizer

# Where each row's image path leads: the first stays in the dataset's folder, the others leave it.
PATHS = {"inside": "inside.png", "absolute": None, "parent": "../secret.png", "climb": "sub/../../secret.png",
         "symlink": "link.png"}


def _dataset(tmp_path, layout: str) -> DataConfig:
    """A dataset folder `data` holding a red image and a symlink to `secret.png` (blue) beside the folder, with
    one row per entry of PATHS (key = the entry's name) in `layout`: parquet, imagefolder jsonl or csv."""
    data, secret = tmp_path / "data", tmp_path / "secret.png"
    (data / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(data / "inside.png")
    Image.new("RGB", (16, 16), "blue").save(secret)
    os.symlink(secret, data / "link.png")
    rows = [{"key": key, "file_name": path or str(secret), "text": f"a {key} square"} for key, path in PATHS.items()]
    if layout == "parquet":
        table = {"key": [r["key"] for r in rows], "image": [r["file_name"] for r in rows],
                 "text": [r["text"] for r in rows]}
        pq.write_table(pa.table(table), data / "rows.parquet")
        return DataConfig(source="parquet", path=str(data))
    if layout == "jsonl":
        (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    else:
        (data / "metadata.csv").write_text("key,file_name,text\n" + "".join(
            f"{r['key']},{r['file_name']},{r['text']}\n" for r in rows))
    return DataConfig(source="imagefolder", path=str(data))


def _stream(config: DataConfig) -> ImageTextStream:
    config.resolution, config.caption_dropout, config.shuffle_buffer = 8, 0.0, 0
    return ImageTextStream(build_source(config, seed=0), config, build_tokenizer(["a square"], 8), seed=0)


@pytest.mark.parametrize("layout", ["parquet", "jsonl", "csv"])
def test_image_paths_that_leave_the_dataset_folder_are_skipped_and_counted(tmp_path, layout, caplog):
    stream = _stream(_dataset(tmp_path, layout))
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        examples = list(stream)
    assert [e["key"] for e in examples] == ["inside"]
    assert dict(stream.counts) == {"used": 1, "skipped: path outside the dataset folder": 4}
    for path in [str(tmp_path / "secret.png"), "../secret.png", "sub/../../secret.png", "link.png"]:
        assert f"image path {path!r} leads outside the dataset folder" in caplog.text
    assert caplog.text.count("Set data.allow_outside_paths: true") == 4


@pytest.mark.parametrize("layout", ["parquet", "jsonl", "csv"])
def test_allow_outside_paths_reads_them(tmp_path, layout):
    config = _dataset(tmp_path, layout)
    config.allow_outside_paths = True
    examples = {e["key"]: e["pixel_values"] for e in _stream(config)}
    assert sorted(examples) == sorted(PATHS)
    assert examples["inside"][:, 0, 0].tolist() == [255, 0, 0]
    assert all(examples[key][:, 0, 0].tolist() == [0, 0, 255] for key in PATHS if key != "inside")


def test_refused_paths_count_towards_max_bad_fraction(tmp_path):
    """20 rows inside and 10 outside: a third of the samples bad, more than data.max_bad_fraction (0.1)."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16), "red").save(data / "inside.png")
    paths = ["inside.png"] * 20 + ["/etc/hostname"] * 10
    pq.write_table(pa.table({"image": paths, "text": ["a red square"] * 30}), data / "rows.parquet")
    with pytest.raises(RuntimeError, match=r"10 of the 30 samples.*'skipped: path outside the dataset folder': 10"):
        list(_stream(DataConfig(source="parquet", path=str(data))))


def _shard(folder) -> str:
    """One tar shard of two red images with captions."""
    path = folder / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for key in ("a", "b"):
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
            for name, payload in ((f"{key}.png", buffer.getvalue()), (f"{key}.txt", b"a red square")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


@pytest.mark.parametrize("pattern", [
    "pipe:touch {marker}; cat {shard}",
    "{shard}::pipe:touch {marker}",  # a second pattern after `::`
    "{{{shard},pipe:touch {marker}}}",  # one alternative of a brace list
    "PIPE:touch {marker}",  # schemes are case-insensitive
])
def test_pipe_urls_are_refused_unless_allowed(tmp_path, pattern):
    marker = tmp_path / "ran"
    config = DataConfig(source="webdataset", path=pattern.format(shard=_shard(tmp_path), marker=marker))
    with pytest.raises(ConfigError, match=r"shard URL '(?i:pipe):touch .*data.allow_pipe_urls: true"):
        build_source(config, seed=0)
    assert not marker.exists()


def test_allowed_pipe_url_runs_its_command(tmp_path):
    config = DataConfig(source="webdataset", path=f"pipe:cat {_shard(tmp_path)}", allow_pipe_urls=True)
    assert [e["key"] for e in _stream(config)] == ["a", "b"]


def test_a_builtin_folder_named_like_a_pipe_is_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = DataConfig(source="builtin", path="pipe:touch ran", num_samples=64)
    assert len(list(_stream(config))) == 64
    assert (tmp_path / "pipe:touch ran" / "00000.tar").is_file() and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"source": "webdataset", "path": "x.tar", "allow_outside_paths": True},
     "data.allow_outside_paths: only parquet and imagefolder data name image paths"),
    ({"source": "parquet", "path": "x", "allow_pipe_urls": True},
     "data.allow_pipe_urls: only webdataset shards are opened by URL"),
])
def test_the_allow_keys_are_refused_where_they_mean_nothing(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**overrides)
