"""Sources that read rows rather than tar members: HF datasets (on disk, from the Hub, or streaming), parquet files
read in row groups, and folders of images with captions (imagefolder metadata or sidecar `.txt` files).

Each source yields `RawSample`s for one reader (`part` of `parts`: processes x dataloader workers), in an order
that depends only on `order_rng` (and `deal_rng`, see `deal`), and counts what it had to skip in `counts`. An image
path in a parquet cell or an imagefolder metadata row must stay inside the dataset's folder (`check_inside`) unless
`data.allow_outside_paths` is set.
"""

import glob
import json
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class NoData(UserError, FileNotFoundError):
    """data.path holds none of what the source reads: a user's mistake (one line), and a missing file."""


@dataclass
class RawSample:
    key: str
    image: bytes | None
    caption: str | list | None
    metadata: dict = field(default_factory=dict)
    refused: str | None = None  # why the source would not read this sample's image (then `image` is None)
    mask: bytes | None = None  # a mask image beside it (webdataset `<key>.mask.png`), for data.masks
    dataset: int = 0  # which of data.sources it comes from (`mixing.MixedSource`)


def deal(units: Sequence, order_rng: random.Random, part: int, parts: int,
         deal_rng: random.Random | None = None) -> list:
    """Reader `part`'s share of `units` (shards, row groups, rows) in this epoch's order. Without `deal_rng`, the
    units are shuffled by `order_rng` (this epoch's generator) and dealt `[part::parts]`: each epoch deals anew, so a
    reader meets about 1/parts of its earlier units again. With `deal_rng` (a generator that is the same every epoch;
    the stream passes one with `data.cache`), it decides which units each reader gets, the same every epoch (its
    process's cache hits from the second epoch on), and only the order within each share is new each epoch.
    Reader 0 shuffles its share with `order_rng` itself, so a lone reader gets the order it gets without
    `deal_rng`; every other reader with a generator of its own, so that the readers' orders are independent."""
    if deal_rng is None:
        units = list(units)
        order_rng.shuffle(units)
        return units[part::parts]
    dealt = list(range(len(units)))
    deal_rng.shuffle(dealt)
    mine = [units[i] for i in sorted(dealt[part::parts])]
    (order_rng if part == 0 else random.Random(f"{order_rng.random()}-{part}")).shuffle(mine)
    return mine


class OutsidePath(ValueError):
    """An image path that leads outside the dataset's folder."""


def check_inside(value: str, root: Path) -> None:
    """Refuse an image path that leads outside `root`: absolute, or outside once `..` and symlinks are resolved.
    The data chooses which files training reads; a table from elsewhere must not reach the rest of the disk."""
    if os.path.isabs(value) or not (root / value).resolve().is_relative_to(root.resolve()):
        raise OutsidePath(f"image path {value!r} leads outside the dataset folder {str(root)!r} (an absolute path, "
                          "'..' or a symlink); refused so that the data cannot make training read other files. Set "
                          "data.allow_outside_paths: true to read it, if you trust the data")


def image_bytes(value, root: Path | None = None, allow_outside: bool = False) -> bytes | None:
    """The encoded image of a table cell: raw bytes, an HF `Image(decode=False)` dict, or a path; None when there is
    none. A path is relative to `root` and must stay inside it unless `allow_outside` (`OutsidePath`); without a
    root (an HF dataset's own files) it is read as it is."""
    if isinstance(value, dict):
        return value.get("bytes") or image_bytes(value.get("path"), root, allow_outside)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value and "\0" not in value:  # (a NUL byte names no file)
        if root is not None and not allow_outside:
            check_inside(value, root)
        path = Path(value) if root is None else root / value
        return path.read_bytes() if path.is_file() else None
    return None


def _row_metadata(row: dict, image_column: str) -> dict:
    return {k: v for k, v in row.items() if k != image_column and not isinstance(v, (bytes, bytearray, dict))}


def _row_sample(key: str, row: dict, image_column: str, caption_column: str, root: Path,
                allow_outside: bool) -> RawSample:
    """The sample of a table row whose image cell may be a path under `root`; one that leads outside is refused
    here and counted as bad by the stream, so one such row does not stop the run."""
    try:
        image, refused = image_bytes(row.get(image_column), root, allow_outside), None
    except OutsidePath as error:
        image, refused = None, str(error)
    return RawSample(key, image, row.get(caption_column), _row_metadata(row, image_column), refused)


class HFDatasetSource:
    """A HF `datasets` dataset: `load_from_disk(path)` for a saved one, else `load_dataset(path, split=split)`
    (a Hub name when online, or a local folder), optionally streaming."""

    def __init__(self, path: str, split: str, image_column: str, caption_column: str, streaming: bool = False):
        import datasets

        if Path(path, "dataset_info.json").is_file() or Path(path, "state.json").is_file():
            dataset = datasets.load_from_disk(path)
            dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
            if streaming:
                dataset = dataset.to_iterable_dataset(num_shards=max(1, min(64, len(dataset))))
        else:
            if (os.path.isabs(path) or path.startswith((".", "~"))) and not os.path.exists(os.path.expanduser(path)):
                raise NoData(f"data.path={path!r}: no such folder; give the folder that Dataset.save_to_disk wrote, a "
                             "folder of data files that datasets.load_dataset reads, or a dataset's name on the Hub")
            try:
                dataset = datasets.load_dataset(path, split=split, streaming=streaming)
            except FileNotFoundError as error:  # (a name that is neither a folder nor, offline, a cached dataset)
                raise NoData(f"data.path={path!r}: {error}") from error
        columns = dataset.column_names or list(dataset.features or {})
        missing = [c for c in (image_column, caption_column) if c not in columns]
        if missing:
            raise UserError(f"data.path={path!r}: column(s) {missing} not found; the dataset has {columns}. Set "
                            "data.image_column / data.caption_column to the right names")
        if isinstance(dataset.features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.streaming = dataset, streaming
        self.image_column, self.caption_column = image_column, caption_column
        self.num_samples = None if streaming else len(dataset)

    def samples(self, order_rng: random.Random, part: int, parts: int, counts: Counter,
                deal_rng: random.Random | None = None) -> Iterator[RawSample]:
        if self.streaming:  # whole shards per process when they divide evenly, else every n-th row (no deal_rng:
            # data.cache, which passes one, is refused for a stream, whose keys are not stable)
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
        for index in deal(range(len(self.dataset)), order_rng, part, parts, deal_rng):
            yield self._sample(self.dataset[index], str(index))

    def _sample(self, row: dict, fallback_key: str) -> RawSample:
        image = row[self.image_column]
        path = image.get("path") if isinstance(image, dict) else None
        key = str(row.get("key") or row.get("__key__") or path or fallback_key)  # the whole path: unique
        return RawSample(key, image_bytes(image), row[self.caption_column], _row_metadata(row, self.image_column))


class ParquetSource:
    """Parquet files (a file, a folder of them, or a glob) with an image column (bytes, an HF image struct, or a
    path relative to the file, inside its folder) and a caption column, read with pyarrow one row group at a time;
    the row groups are what the readers split between them."""

    def __init__(self, path: str, image_column: str, caption_column: str, allow_outside_paths: bool = False):
        import pyarrow.parquet as pq

        files = sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else sorted(glob.glob(path))
        if not files:
            raise NoData(f"data.path={path!r}: no parquet files there")
        self.groups, self.num_samples = [], 0
        for file in files:
            metadata = pq.ParquetFile(file).metadata
            names = metadata.schema.names
            missing = [c for c in (image_column, caption_column) if c not in names]
            if missing:
                raise UserError(f"{file}: column(s) {missing} not found; it has {names}. Set data.image_column / "
                                "data.caption_column to the right names")
            self.groups += [(file, g) for g in range(metadata.num_row_groups)]
            self.num_samples += metadata.num_rows
        self.image_column, self.caption_column = image_column, caption_column
        self.allow_outside_paths = allow_outside_paths

    def check_readers(self, readers: int) -> None:
        """Each of `readers` readers needs a row group of its own."""
        if len(self.groups) < readers:
            raise UserError(f"{len(self.groups)} parquet row group(s) cannot be split over {readers} readers "
                            "(processes x data.num_workers); write smaller row groups or use fewer workers")

    def samples(self, order_rng: random.Random, part: int, parts: int, counts: Counter,
                deal_rng: random.Random | None = None) -> Iterator[RawSample]:
        import pyarrow.parquet as pq

        self.check_readers(parts)
        for file, group in deal(self.groups, order_rng, part, parts, deal_rng):
            try:
                rows = pq.ParquetFile(file).read_row_group(group).to_pylist()
            except Exception:  # noqa: BLE001 - a damaged row group is skipped and counted, not fatal
                counts["skipped: unreadable shard data"] += 1
                continue
            root = Path(file).parent
            for i, row in enumerate(rows):
                key = str(row.get("key") or f"{Path(file).stem}-{group}-{i}")
                yield _row_sample(key, row, self.image_column, self.caption_column, root, self.allow_outside_paths)


class MetadataFolderSource:
    """A folder of images listed in `metadata.jsonl` or `metadata.csv` (the HF imagefolder layout): a `file_name`
    column with each image's path, relative to the folder and inside it, and a caption column. Read here rather
    than by `datasets`, so that a path leading outside is one bad sample (or read, with data.allow_outside_paths)
    instead of a failed load, whatever the `datasets` version."""

    def __init__(self, path: str, caption_column: str, allow_outside_paths: bool = False):
        self.root, self.rows = Path(path), _metadata_rows(Path(path), caption_column)
        columns = sorted(set().union(*self.rows))
        missing = [c for c in ("file_name", caption_column) if c not in columns]
        if missing:
            raise UserError(f"data.path={path!r}: column(s) {missing} not found in its metadata file; it has "
                            f"{columns}. Name each image in `file_name`, and set data.caption_column to the column "
                            "of the captions")
        self.caption_column, self.allow_outside_paths = caption_column, allow_outside_paths
        self.num_samples = len(self.rows)

    def samples(self, order_rng: random.Random, part: int, parts: int, counts: Counter,
                deal_rng: random.Random | None = None) -> Iterator[RawSample]:
        for index in deal(range(len(self.rows)), order_rng, part, parts, deal_rng):
            row = self.rows[index]
            key = str(row.get("key") or row.get("file_name") or index)
            yield _row_sample(key, row, "file_name", self.caption_column, self.root, self.allow_outside_paths)


def _metadata_rows(root: Path, caption_column: str) -> list[dict]:
    """The rows of `root/metadata.jsonl` (a JSON object a line), else of `root/metadata.csv` (file names and
    captions read as text, the other columns typed: numbers for the LAION filters)."""
    jsonl = root / "metadata.jsonl"
    if jsonl.is_file():
        try:
            rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
        except ValueError as error:
            raise UserError(f"{jsonl}: not JSON lines ({error}); write one JSON object a line") from None
        if not all(isinstance(row, dict) for row in rows):
            raise UserError(f"{jsonl}: every line must be a JSON object (one image's row)")
        return rows
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    text = pa_csv.ConvertOptions(column_types={name: pa.string() for name in ("file_name", caption_column)})
    return pa_csv.read_csv(root / "metadata.csv", convert_options=text).to_pylist()


class SidecarFolderSource:
    """A folder of images, each with a caption in a `.txt` file of the same name (`cat.jpg` + `cat.txt`; another
    extension with data.caption_extension), the common hand-made layout; subfolders included."""

    def __init__(self, path: str, caption_extension: str = ".txt"):
        root, self.caption_extension = Path(path), caption_extension
        self.images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise NoData(f"data.path={path!r}: no images ({', '.join(IMAGE_SUFFIXES)}) there")
        self.root, self.num_samples = root, len(self.images)

    def samples(self, order_rng: random.Random, part: int, parts: int, counts: Counter,
                deal_rng: random.Random | None = None) -> Iterator[RawSample]:
        for image in deal(self.images, order_rng, part, parts, deal_rng):
            text = image.with_suffix(self.caption_extension)
            caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else None
            yield RawSample(str(image.relative_to(self.root)), image.read_bytes(), caption)

