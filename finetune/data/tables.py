"""Sources that read rows rather than tar members: HF datasets (on disk, from the Hub, or streaming), parquet files
read in row groups, and folders of images with captions (imagefolder metadata or sidecar `.txt` files).

Each source yields `RawSample`s for one reader (`part` of `parts`: processes x dataloader workers), in an order
that depends only on `order_rng`, and counts what it had to skip in `counts`.
"""

import glob
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class RawSample:
    key: str
    image: bytes | None
    caption: str | list | None
    metadata: dict = field(default_factory=dict)


def image_bytes(value, root: Path | None = None) -> bytes | None:
    """The encoded image of a table cell: raw bytes, an HF `Image(decode=False)` dict, or a path (relative to
    `root`); None when there is none."""
    if isinstance(value, dict):
        return value.get("bytes") or image_bytes(value.get("path"), root)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value) if root is None or os.path.isabs(value) else root / value
        return path.read_bytes() if path.is_file() else None
    return None


def _row_metadata(row: dict, image_column: str) -> dict:
    return {k: v for k, v in row.items() if k != image_column and not isinstance(v, (bytes, bytearray, dict))}


class HFDatasetSource:
    """A HF `datasets` dataset: `load_from_disk(path)` for a saved one, else `load_dataset(path, split=split)`
    (a Hub name when online, or a local folder; with `builder`, `load_dataset(builder, data_dir=path)`),
    optionally streaming."""

    def __init__(self, path: str, split: str, image_column: str, caption_column: str, streaming: bool = False,
                 builder: str | None = None):
        import datasets

        if builder:
            dataset = datasets.load_dataset(builder, data_dir=path, split=split, streaming=streaming)
        elif Path(path, "dataset_info.json").is_file() or Path(path, "state.json").is_file():
            dataset = datasets.load_from_disk(path)
            dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
            if streaming:
                dataset = dataset.to_iterable_dataset(num_shards=max(1, min(64, len(dataset))))
        else:
            dataset = datasets.load_dataset(path, split=split, streaming=streaming)
        columns = dataset.column_names or list(dataset.features or {})
        missing = [c for c in (image_column, caption_column) if c not in columns]
        if missing:
            raise ValueError(f"data.path={path!r}: column(s) {missing} not found; the dataset has {columns}. Set "
                             "data.image_column / data.caption_column to the right names")
        if isinstance(dataset.features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.streaming = dataset, streaming
        self.image_column, self.caption_column = image_column, caption_column
        self.num_samples = None if streaming else len(dataset)

    def samples(self, order_rng: random.Random, part: int, parts: int, counts: Counter) -> Iterator[RawSample]:
        if self.streaming:  # whole shards per process when they divide evenly, else every n-th row
            from datasets.distributed import split_dataset_by_node
            from torch.utils.data import get_worker_info

            # Inside a dataloader worker, datasets splits the process's shards between the workers itself: split
            # by process only, or each worker would read a part of a part.
            workers = get_worker_info().num_workers if get_worker_info() else 1
            rows = split_dataset_by_node(self.dataset.shuffle(seed=order_rng.randrange(2**32)), part // workers,
                                         parts // workers)
            for i, row in enumerate(rows):
                yield self._sample(row, f"{part}-{i}")
            return
        indices = list(range(len(self.dataset)))
        order_rng.shuffle(indices)
        for index in indices[part::parts]:
            yield self._sample(self.dataset[index], str(index))

    def _sample(self, row: dict, fallback_key: str) -> RawSample:
        image = row[self.image_column]
        path = image.get("path") if isinstance(image, dict) else None
        key = str(row.get("key") or row.get("__key__") or path or fallback_key)  # the whole path: unique
        return RawSample(key, image_bytes(image), row[self.caption_column], _row_metadata(row, self.image_column))


class ParquetSource:
    """Parquet files (a file, a folder of them, or a glob) with an image column (bytes, an HF image struct, or a
    path relative to the file) and a caption column, read with pyarrow one row group at a time; the row groups
    are what the readers split between them."""

    def __init__(self, path: str, image_column: str, caption_column: str):
        import pyarrow.parquet as pq

        files = sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else sorted(glob.glob(path))
        if not files:
            raise FileNotFoundError(f"data.path={path!r}: no parquet files there")
        self.groups, self.num_samples = [], 0
        for file in files:
            metadata = pq.ParquetFile(file).metadata
            names = metadata.schema.names
            missing = [c for c in (image_column, caption_column) if c not in names]
            if missing:
                raise ValueError(f"{file}: column(s) {missing} not found; it has {names}. Set data.image_column / "
                                 "data.caption_column to the right names")
            self.groups += [(file, g) for g in range(metadata.num_row_groups)]
            self.num_samples += metadata.num_rows
        self.image_column, self.caption_column = image_column, caption_column

    def samples(self, order_rng: random.Random, part: int, parts: int, counts: Counter) -> Iterator[RawSample]:
        import pyarrow.parquet as pq

        if len(self.groups) < parts:
            raise ValueError(f"{len(self.groups)} parquet row group(s) cannot be split over {parts} readers (processes "
                             "x data.num_workers); write smaller row groups or use fewer workers")
        groups = list(self.groups)
        order_rng.shuffle(groups)
        for file, group in groups[part::parts]:
            try:
                rows = pq.ParquetFile(file).read_row_group(group).to_pylist()
            except Exception:  # noqa: BLE001 - a damaged row group is skipped and counted, not fatal
                counts["skipped: unreadable shard data"] += 1
                continue
            root = Path(file).parent
            for i, row in enumerate(rows):
                key = str(row.get("key") or f"{Path(file).stem}-{group}-{i}")
                yield RawSample(key, image_bytes(row[self.image_column], root), row[self.caption_column],
                                _row_metadata(row, self.image_column))


class SidecarFolderSource:
    """A folder of images, each with a caption in a `.txt` file of the same name (`cat.jpg` + `cat.txt`), the
    common hand-made layout; subfolders included."""

    def __init__(self, path: str):
        root = Path(path)
        self.images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise FileNotFoundError(f"data.path={path!r}: no images ({', '.join(IMAGE_SUFFIXES)}) there")
        self.root, self.num_samples = root, len(self.images)

    def samples(self, order_rng: random.Random, part: int, parts: int, counts: Counter) -> Iterator[RawSample]:
        images = list(self.images)
        order_rng.shuffle(images)
        for image in images[part::parts]:
            text = image.with_suffix(".txt")
            caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else None
            yield RawSample(str(image.relative_to(self.root)), image.read_bytes(), caption)

