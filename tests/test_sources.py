"""Every data source yields the same samples for the same data, and splits it disjointly between readers."""

import io
import json
import subprocess
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from finetune.config import DataConfig
from finetune.data import ImageTextStream, build_source
from finetune.models import build_tokenizer

COLORS = ["red", "green", "blue", "yellow", "orange", "purple"]
PAIRS = [(f"s{i:02d}", f"a {COLORS[i % 6]} square number {i}",
          Image.fromarray(np.full((12, 10, 3), (i * 37 % 256, i * 91 % 256, i * 53 % 256), dtype=np.uint8)))
         for i in range(12)]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write(kind: str, root) -> DataConfig:
    """The same 12 image-caption pairs in the layout of one source; the config that reads them."""
    root.mkdir()
    if kind == "webdataset":
        with tarfile.open(root / "00000.tar", "w") as tar:
            for key, caption, image in PAIRS:
                for name, payload in ((f"{key}.png", _png(image)), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        return DataConfig(source="webdataset", path=str(root / "00000.tar"))
    if kind in ("imagefolder", "sidecar"):
        for key, caption, image in PAIRS:
            image.save(root / f"{key}.png")
            if kind == "sidecar":
                (root / f"{key}.txt").write_text(caption)
        if kind == "imagefolder":
            (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{k}.png", "text": c})
                                                           for k, c, _ in PAIRS))
        return DataConfig(source="imagefolder", path=str(root))
    if kind.startswith("hf"):
        import datasets

        table = {"image": [{"bytes": _png(i), "path": None} for _, _, i in PAIRS], "text": [c for _, c, _ in PAIRS]}
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        datasets.Dataset.from_dict(table, features=features).save_to_disk(str(root / "saved"))
        return DataConfig(source="hf", path=str(root / "saved"), streaming=kind == "hf-streaming")
    # parquet: bytes in one file (two row groups), paths relative to the file in another
    pq.write_table(pa.table({"jpg": [_png(i) for _, _, i in PAIRS[:8]], "caption": [c for _, c, _ in PAIRS[:8]]}),
                   root / "a.parquet", row_group_size=4)
    for key, _, image in PAIRS[8:]:
        image.save(root / f"{key}.png")
    pq.write_table(pa.table({"jpg": [f"{k}.png" for k, _, _ in PAIRS[8:]], "caption": [c for _, c, _ in PAIRS[8:]]}),
                   root / "b.parquet")
    return DataConfig(source="parquet", path=str(root), image_column="jpg", caption_column="caption")


KINDS = ["webdataset", "imagefolder", "sidecar", "hf", "hf-streaming", "parquet"]


def _examples(config: DataConfig, part: int = 0, parts: int = 1) -> list[tuple[str, bytes]]:
    config.resolution, config.caption_dropout, config.shuffle_buffer = 8, 0.0, 4
    tokenizer = build_tokenizer([c for _, c, _ in PAIRS], 10)
    stream = ImageTextStream(build_source(config, seed=0), config, tokenizer, seed=0, rank=part, world_size=parts)
    return [(tokenizer.decode(e["input_ids"], skip_special_tokens=True), e["pixel_values"].numpy().tobytes())
            for e in stream]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return sorted(_examples(_write("webdataset", tmp_path_factory.mktemp("ref") / "data")))


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_yields_the_same_samples(kind, tmp_path, reference):
    assert len(reference) == 12
    assert sorted(_examples(_write(kind, tmp_path / "data"))) == reference


@pytest.mark.parametrize("kind", ["imagefolder", "sidecar", "hf", "hf-streaming", "parquet"])
def test_readers_get_disjoint_parts_that_cover_the_data(kind, tmp_path, reference):
    config = _write(kind, tmp_path / "data")
    parts = [_examples(config, part, 3) for part in range(3)]
    assert all(parts) and sorted(sum(parts, [])) == reference


def test_a_missing_column_names_the_columns_there(tmp_path):
    config = _write("parquet", tmp_path / "data")
    config.caption_column = "text"
    with pytest.raises(ValueError, match=r"column\(s\) \['text'\] not found.*data.caption_column"):
        build_source(config, seed=0)


def test_caption_dropout_frequency(tmp_path):
    config = _write("webdataset", tmp_path / "data")
    config.resolution, config.caption_dropout = 8, 0.25
    tokenizer = build_tokenizer([c for _, c, _ in PAIRS], 10)
    stream = ImageTextStream(build_source(config, seed=0), config, tokenizer, seed=0)
    empty = tokenizer([""], padding="max_length", max_length=10, return_tensors="pt").input_ids[0]
    dropped = Counter()
    for epoch in range(40):
        stream.set_epoch(epoch)
        dropped.update(bool((e["input_ids"] == empty).all()) for e in stream)
    assert abs(dropped[True] / (40 * 12) - 0.25) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_two_processes_read_disjoint_parts_that_cover_an_epoch(tmp_path, workers):
    """Under `accelerate launch` with 2 processes (and 2 dataloader workers each), the sample keys of one epoch:
    every key of the set once, none twice. The last partial batch of each reader is dropped, so the batch size
    is 1 here."""
    from .test_train import ROOT, _env, _two_process_launcher

    config = _write("webdataset", tmp_path / "data")
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(config.path) as whole:  # one shard per sample: enough for 2 processes x 2 workers
        members = whole.getmembers()
        for i in range(0, len(members), 2):
            with tarfile.open(shards / f"{i // 2:05d}.tar", "w") as tar:
                for member in members[i:i + 2]:
                    tar.addfile(member, whole.extractfile(member))
    overrides = ["data.source=webdataset", f"data.path={shards}/{{00000..00011}}.tar", "train.train_batch_size=1",
                 f"data.num_workers={workers}", "data.resolution=8", "data.caption_dropout=0"]
    result = subprocess.run([*_two_process_launcher(), str(ROOT / "tests" / "epoch_keys.py"), str(tmp_path / "out"),
                             *overrides], cwd=tmp_path, env=_env(tmp_path, {"ACCELERATE_USE_CPU": "1"}),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / "out" / f"keys_{rank}.json").read_text()) for rank in (0, 1)]
    assert {s["distributed_type"] for s in seen} == {"MULTI_CPU"}
    keys = seen[0]["keys"] + seen[1]["keys"]
    assert seen[0]["keys"] and seen[1]["keys"]
    assert sorted(keys) == sorted(key for key, _, _ in PAIRS) and len(set(keys)) == len(keys)


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_follow_set_epoch(tmp_path, persistent):
    """Two dataloader workers, kept alive between epochs or not: each epoch's order is the one set_epoch asks
    for, the same as reading in the main process."""
    import torch

    config = _write("sidecar", tmp_path / "data")
    config.resolution, config.caption_dropout, config.shuffle_buffer = 8, 0.0, 4
    tokenizer = build_tokenizer([c for _, c, _ in PAIRS], 10)
    stream = ImageTextStream(build_source(config, seed=0), config, tokenizer, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=1, num_workers=2, persistent_workers=persistent)
    orders = []
    for epoch in (0, 1, 0):
        stream.set_epoch(epoch)
        orders.append([batch["key"][0] for batch in loader])
    assert orders[0] == orders[2] != orders[1]


def test_webdataset_reads_pipe_commands_and_http_urls(tmp_path, reference):
    """Shards through `pipe:cat ...` (allowed with data.allow_pipe_urls) and over HTTP (a server on 127.0.0.1) give
    the same samples as the file."""
    import functools
    import http.server
    import threading

    config = _write("webdataset", tmp_path / "data")
    piped = DataConfig(source="webdataset", path=f"pipe:cat {config.path}", allow_pipe_urls=True)
    assert sorted(_examples(piped)) == reference
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "data"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = DataConfig(source="webdataset", path=f"http://127.0.0.1:{server.server_address[1]}/00000.tar")
        assert sorted(_examples(url)) == reference
    finally:
        server.shutdown()


def test_streaming_hf_with_workers_reads_everything_once(tmp_path, reference):
    """datasets splits a streamed dataset between dataloader workers itself; the source splits by process only,
    so 2 workers still read every sample once."""
    import torch

    config = _write("hf-streaming", tmp_path / "data")
    config.resolution, config.caption_dropout, config.shuffle_buffer = 8, 0.0, 4
    tokenizer = build_tokenizer([c for _, c, _ in PAIRS], 10)
    stream = ImageTextStream(build_source(config, seed=0), config, tokenizer, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=1, num_workers=2)
    seen = [(tokenizer.decode(b["input_ids"][0], skip_special_tokens=True), b["pixel_values"][0].numpy().tobytes())
            for b in loader]
    assert sorted(seen) == reference
