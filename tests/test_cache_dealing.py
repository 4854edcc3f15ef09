"""With data.cache, each reader (process x dataloader worker) gets the same units every epoch, so the in-memory
cache of its process hits from the second epoch on; the order within each part still changes every epoch.

The readers are simulated by asking the stream for part `part` of `parts` (`ImageTextStream.raw_samples`, what
each reader reads before the shuffle buffer); a hit is a sample key this reader saw in an earlier epoch. Run with
`-s` to see the table of hit rates per epoch for 1, 2 and 8 processes, with the cache and without it.
"""

import io
import json
import random
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from finetune.config import DataConfig
from finetune.data import ImageTextStream, WebDatasetSource, build_source
from finetune.models import build_tokenizer

EPOCHS, PROCESSES = 3, (1, 2, 8)


def _webdataset(tmp_path):
    """1,024 shards of 2 samples each, by name only: the dealing is exercised without reading files."""
    source = WebDatasetSource("shard-{0000..1023}.tar", "caption")
    source._read = lambda shards, on_error: ({"__key__": f"{url}/{i}", "txt": b"a caption"}
                                             for url in shards for i in range(2))
    return source


def _parquet(tmp_path):
    """256 row groups of 2 rows in one file."""
    table = pa.table({"image": [b"not decoded here"] * 512, "text": ["a caption"] * 512})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=2)
    return build_source(DataConfig(source="parquet", path=str(tmp_path)), seed=0)


def _hf(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"image": [b"x"] * 512, "text": ["a caption"] * 512}).save_to_disk(str(tmp_path / "hf"))
    return build_source(DataConfig(source="hf", path=str(tmp_path / "hf")), seed=0)


def _imagefolder(tmp_path):
    """512 rows of metadata.jsonl (images that are not there: the source still yields each row's sample)."""
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i:04d}.png", "text": "a caption"})
                                                       for i in range(512)))
    return build_source(DataConfig(source="imagefolder", path=str(tmp_path)), seed=0)


def _sidecar(tmp_path):
    for i in range(256):
        (tmp_path / f"{i:04d}.png").write_bytes(b"")
    return build_source(DataConfig(source="imagefolder", path=str(tmp_path)), seed=0)


SOURCES = {"webdataset": _webdataset, "parquet": _parquet, "hf": _hf, "imagefolder": _imagefolder,
           "sidecar": _sidecar}
HIT_RATES: dict[tuple[str, bool, int], list[float]] = {}  # (source, cache, processes) -> hit rate per epoch


def _reads(source, cache: bool, parts: int, seed: int = 0) -> list[list[list[str]]]:
    """The sample keys each of `parts` readers reads in each of the epochs: [epoch][part] -> keys in order."""
    config = DataConfig(source="webdataset", path="unused", cache=cache)
    stream = ImageTextStream(source, config, tokenizer=None, seed=seed)
    reads = []
    for epoch in range(EPOCHS):
        stream.set_epoch(epoch)
        reads.append([[raw.key for raw in stream.raw_samples(part, parts)] for part in range(parts)])
    return reads


def _all_keys(source) -> list[str]:
    keys = [raw.key for raw in source.samples(random.Random(0), 0, 1, Counter())]
    assert len(set(keys)) == len(keys) >= 256
    return sorted(keys)


def _hit_rates(reads: list[list[list[str]]]) -> list[float]:
    """Per epoch, the share of the samples read that their reader had read in an earlier epoch (its cache)."""
    seen = [set() for _ in reads[0]]
    rates = []
    for epoch in reads:
        hits = sum(key in seen[part] for part, keys in enumerate(epoch) for key in keys)
        rates.append(hits / sum(map(len, epoch)))
        for part, keys in enumerate(epoch):
            seen[part].update(keys)
    return rates


def _report(name: str, cache: bool, processes: int, rates: list[float]) -> None:
    HIT_RATES[name, cache, processes] = rates
    print(f"\n{name:>11} cache={'on ' if cache else 'off'} {processes} process(es): hit rate in epochs 1-{EPOCHS}: "
          + " / ".join(f"{rate:6.1%}" for rate in rates))


@pytest.fixture(scope="module", params=list(SOURCES))
def source(request, tmp_path_factory):
    return request.param, SOURCES[request.param](tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("processes", PROCESSES)
def test_with_the_cache_each_reader_meets_its_samples_again(source, processes):
    """(a) Cache on: no hit in epoch 1, every sample a hit in epochs 2 and 3, for 1, 2 and 8 processes. (b) The
    parts are disjoint and cover the data every epoch. (c) Each part is still read in a new order every epoch."""
    name, source = source
    reads = _reads(source, cache=True, parts=processes)
    everything = _all_keys(source)
    for epoch in reads:
        assert sorted(sum(epoch, [])) == everything  # every sample once: disjoint parts that cover the data
        assert all(epoch)
    for part in range(processes):
        assert sorted(reads[1][part]) == sorted(reads[0][part])  # the same samples ...
        assert reads[1][part] != reads[0][part] and reads[2][part] != reads[1][part]  # ... in a new order
    rates = _hit_rates(reads)
    _report(name, True, processes, rates)
    assert rates == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("processes", PROCESSES)
def test_without_the_cache_each_epoch_deals_anew(source, processes):
    """(d) Cache off, each epoch deals the units anew (the behaviour before the cache changed it, kept there): a
    reader meets about 1/processes of its earlier samples in epoch 2 and 1 - (1 - 1/processes)^2 in epoch 3, so
    the cache-on assertions above fail for this dealing whenever there is more than one reader."""
    name, source = source
    reads = _reads(source, cache=False, parts=processes)
    everything = _all_keys(source)
    for epoch in reads:
        assert sorted(sum(epoch, [])) == everything
    rates = _hit_rates(reads)
    _report(name, False, processes, rates)
    expected = [0.0] + [1 - (1 - 1 / processes) ** epoch for epoch in range(1, EPOCHS)]
    assert rates == pytest.approx(expected, abs=0.06)
    assert processes == 1 or rates[1] < 0.6  # far from the cache's 100%


def test_the_dealing_is_a_function_of_seed_epoch_part_and_parts():
    """Resume replays an epoch from (seed, epoch, part, parts): a new stream reads the same; another seed deals
    otherwise. One reader reads the same order with the cache as without it."""
    source = _webdataset(None)
    first, again = _reads(source, cache=True, parts=8), _reads(source, cache=True, parts=8)
    assert first == again
    other = _reads(source, cache=True, parts=8, seed=1)
    assert [sorted(keys) for keys in other[0]] != [sorted(keys) for keys in first[0]]
    assert _reads(source, cache=True, parts=1) == _reads(source, cache=False, parts=1)


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), color, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_processes_and_workers_keep_their_samples_through_the_stream(tmp_path):
    """Through the real stream (shuffle buffer, decoding) and DataLoader workers: 2 processes x 2 workers on 8
    shards, with data.cache: each process reads the same samples every epoch, in a new order, and the two
    together read every sample once."""
    for shard in range(8):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for i in range(3):
                for ext, payload in (("png", _png((shard * 30, i * 80, 0))), ("txt", b"a square")):
                    info = tarfile.TarInfo(f"{shard:05d}{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    config = DataConfig(source="webdataset", path=str(tmp_path / "{00000..00007}.tar"), resolution=8,
                        caption_dropout=0.0, shuffle_buffer=4, cache=True, num_workers=2, persistent_workers=True)
    source, tokenizer = build_source(config, seed=0), build_tokenizer(["a square"], 8)
    epochs = []  # [rank] -> keys per epoch
    for rank in range(2):
        stream = ImageTextStream(source, config, tokenizer, seed=0, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
        keys = []
        for epoch in range(EPOCHS):
            stream.set_epoch(epoch)
            keys.append([example["key"] for example in loader])
        epochs.append(keys)
    for keys in epochs:
        assert all(sorted(k) == sorted(keys[0]) for k in keys) and keys[1] != keys[0] and keys[2] != keys[1]
    assert sorted(epochs[0][0] + epochs[1][0]) == sorted(f"{s:05d}{i:04d}" for s in range(8) for i in range(3))
