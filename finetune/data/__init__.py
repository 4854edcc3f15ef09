"""Image-text data: sources, LAION metadata filters, transforms and caption handling.

Every source yields raw samples (key, image bytes, caption, metadata); `ImageTextStream` turns them into
training examples for one process (and one dataloader worker): its own disjoint part of the data (with
`data.cache`, the same part every epoch), a seeded shuffle per epoch, filters, decoding (an unreadable sample is
skipped and counted), transforms, caption dropout and tokenisation.
"""

import copy
import dataclasses
import itertools
import json
import logging
import multiprocessing
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from ..cli import UserError
from ..config import ConfigError, DataConfig, FilterConfig
from ..families import tokenize
from . import shapes
from .mixing import MixedSource, entries
from .tables import HFDatasetSource, MetadataFolderSource, ParquetSource, RawSample, SidecarFolderSource, deal
from .transforms import bucket_sizes, crop_to, decode_mask, decode_rgb, nearest_bucket, unreadable_reason

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
RESAMPLED_GIVE_UP = 10_000  # samples in a row without an example before a resampled stream is called broken


def refuse_pipe_urls(shards: list[str]) -> None:
    """webdataset opens a `pipe:` URL by running the rest of it in a shell (`gopen`, which picks the opener by
    `urlparse(url).scheme`, as here): a data path must not run commands unless the config allows them."""
    pipes = [url for url in shards if _scheme(url) == "pipe"]
    if pipes:
        raise ConfigError([f"data.path: shard URL {pipes[0]!r} ({len(pipes)} of {len(shards)} shards) is a `pipe:` "
                           "URL, which webdataset runs as a shell command; refused so that a data path cannot run "
                           "commands. Set data.allow_pipe_urls: true if you trust the command, or give shard files "
                           "or http(s) URLs"])


def _scheme(url: str) -> str:
    try:
        return urlparse(url).scheme
    except ValueError:  # not a URL that webdataset could open either
        return ""


class WebDatasetSource:
    """Tar shards as img2dataset writes them: local paths, brace patterns, URLs, or (with `allow_pipe_urls`)
    `pipe:` commands; `::` separates several patterns."""

    def __init__(self, pattern: str, caption_field: str, num_samples: int | None = None, resampled: bool = False,
                 allow_pipe_urls: bool = False):
        self.shards = [s for part in pattern.split("::") for s in braceexpand.braceexpand(part)]
        if not allow_pipe_urls:  # every shard, after expansion: a brace list or `::` may hide one
            refuse_pipe_urls(self.shards)
        self.caption_field = caption_field
        self.num_samples = num_samples  # unknown for a stream unless given
        self.resampled = resampled

    def check_readers(self, readers: int) -> None:
        """Each of `readers` readers needs a shard of its own (resampled shards are drawn, not dealt)."""
        if not self.resampled and len(self.shards) < readers:
            raise UserError(f"{len(self.shards)} shard(s) cannot be split over {readers} readers (processes x "
                            "data.num_workers); every reader needs at least one shard: use more shards or fewer "
                            "workers, or set data.resampled: true")

    def samples(self, order_rng: random.Random, part: int, parts: int, counts: Counter,
                deal_rng: random.Random | None = None) -> Iterator[RawSample]:
        """One pass: this reader's disjoint share of the shards, in a seeded order (`deal`). Resampled: shards drawn
        with replacement, without end, from a generator of this epoch and reader (`deal_rng` plays no part)."""
        if self.resampled:
            draw = random.Random(f"{order_rng.random()}-{part}")
            shards = (draw.choice(self.shards) for _ in iter(int, 1))
        else:
            self.check_readers(parts)
            shards = deal(self.shards, order_rng, part, parts, deal_rng)

        def on_error(error: Exception) -> bool:
            counts["skipped: unreadable shard data"] += 1
            logger.warning("skipping unreadable shard data: %s", error)
            return True

        for sample in self._read(shards, on_error):
            image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            metadata = {}
            if "json" in sample:
                try:
                    metadata = json.loads(sample["json"])
                except ValueError:
                    counts["bad metadata"] += 1
            caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else metadata.get(self.caption_field)
            yield RawSample(key=str(sample["__key__"]), image=image, caption=caption, metadata=metadata,
                            mask=sample.get("mask.png"))


    def _read(self, shards, on_error) -> Iterator[dict]:
        """The samples of `shards`, in order. Resampled (endless), shard by shard: when a run of draws opens no
        shard with a sample in it (a wrong path, an unreachable host), stop with an error instead of forever."""
        if not self.resampled:
            yield from wds.tarfile_samples(({"url": url} for url in shards), handler=on_error)
            return
        empty, limit = 0, max(100, 2 * len(self.shards))
        for url in shards:
            opened = False
            for sample in wds.tarfile_samples(iter([{"url": url}]), handler=on_error):
                opened, empty = True, 0
                yield sample
            if not opened:
                empty += 1
                if empty >= limit:
                    raise RuntimeError(f"{limit} shards drawn in a row gave no sample (the last: {url}); check "
                                       "data.path, and that the shards can be read from here")


def build_source(config: DataConfig, seed: int):
    """The raw-sample source named by `data.source` (the built-in set is generated on first use), or with
    `data.sources` the mix of theirs."""
    if config.sources:
        datasets = entries(config)
        return MixedSource(datasets, [build_source(section, seed) for section, _ in datasets])
    if config.source == "builtin":
        colors, num_samples = tuple(config.colors or shapes.DEFAULT_COLORS), config.num_samples or 6000
        return WebDatasetSource(shapes.ensure_shards(config.path, num_samples, colors=colors),
                                config.caption_column, num_samples, config.resampled)
    if config.source == "webdataset":
        return WebDatasetSource(config.path, config.caption_column, config.num_samples, config.resampled,
                                config.allow_pipe_urls)
    if config.source == "parquet":
        return ParquetSource(config.path, config.image_column, config.caption_column, config.allow_outside_paths)
    if config.source == "hf":
        return HFDatasetSource(config.path, config.split, config.image_column, config.caption_column,
                               config.streaming)
    if any((Path(config.path) / name).is_file() for name in ("metadata.jsonl", "metadata.csv")):
        return MetadataFolderSource(config.path, config.caption_column, config.allow_outside_paths)
    return SidecarFolderSource(config.path, config.caption_extension)


def caption_texts(config: DataConfig, source, limit: int = 100_000) -> list[str]:
    """Captions to build a from-scratch tokenizer's vocabulary: the built-in set's whole grammar (purple
    included, so a later fine-tune can teach it), or the first `limit` captions of the source; with the prefix and
    suffix they are trained with, and the default caption."""
    if config.sources:  # every dataset's, each with its own prefix, suffix and default caption
        source = source or build_source(config, 0)
        share = max(1, limit // len(source.sources))  # (a sample of every dataset's captions, not the first's only)
        return [text for section, part in zip(source.configs, source.sources)
                for text in caption_texts(section, part, share)]
    around = dataclasses.replace(config, shuffle_caption=False)  # the words of the captions trained on
    texts = [edit_caption(config.default_caption, around, None)] if config.default_caption else []
    if config.source == "builtin":
        return [edit_caption(c, around, None) for c in shapes.all_captions()] + texts
    source = source or build_source(config, 0)
    if isinstance(source, WebDatasetSource):  # one pass, even over resampled shards
        source = copy.copy(source)
        source.resampled = False
    for sample in source.samples(random.Random(0), 0, 1, Counter()):
        captions = sample.caption if isinstance(sample.caption, list) else [sample.caption]
        texts.extend(edit_caption(c, around, None) for c in captions if isinstance(c, str) and c)
        if len(texts) >= limit:
            break
    return texts


def failed_filter(metadata: dict, caption: str | None, filters: FilterConfig) -> str | None:
    """The name of the first LAION metadata filter this sample fails, or None. A sample missing a field that a
    set filter needs passes or fails as `filters.on_missing` says (reported as `<filter> (missing)`)."""
    checks = [
        ("min_width", metadata.get("width"), lambda v, limit: v >= limit),
        ("min_height", metadata.get("height"), lambda v, limit: v >= limit),
        ("max_pwatermark", metadata.get("pwatermark"), lambda v, limit: v <= limit),
        ("max_punsafe", metadata.get("punsafe"), lambda v, limit: v <= limit),
        ("min_aesthetic", metadata.get("aesthetic"), lambda v, limit: v >= limit),
        ("min_similarity", metadata.get("similarity"), lambda v, limit: v >= limit),
        ("min_caption_chars", None if caption is None else len(caption), lambda v, limit: v >= limit),
        ("max_caption_chars", None if caption is None else len(caption), lambda v, limit: v <= limit),
    ]
    for name, value, passes in checks:
        limit = getattr(filters, name)
        if limit is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            if filters.on_missing == "drop":
                return f"{name} (missing)"
        elif not passes(value, limit):
            return name
    return None


def edit_caption(caption: str, config: DataConfig, rng: random.Random) -> str:
    """`data.caption_prefix` and `caption_suffix` put around the caption (with a space, as kohya does), then with
    `shuffle_caption` its comma-separated tags shuffled after the first `keep_tokens`."""
    caption = " ".join(text for text in (config.caption_prefix, caption, config.caption_suffix) if text)
    if config.shuffle_caption:
        tags = [tag.strip() for tag in caption.split(",")]
        kept, rest = tags[:config.keep_tokens], tags[config.keep_tokens:]
        rng.shuffle(rest)
        caption = ", ".join(kept + rest)
    return caption


def pick_caption(caption, rng: random.Random) -> str | None:
    """A caption string; from a list of captions (several per image), one chosen at random. None when there is
    no usable caption (missing, empty, only whitespace, or not text)."""
    if isinstance(caption, list):
        caption = [c for c in caption if isinstance(c, str) and c.strip()]
        caption = rng.choice(caption) if caption else None
    return caption if isinstance(caption, str) and caption.strip() else None


class ImageTextStream(IterableDataset):
    """Training examples `{"pixel_values", "input_ids", "key", "flipped", "original_size", "crop_top_left"}` (and
    `mask` with data.masks) for process `rank` of `world_size`; the pixels are (3, H, W) uint8
    (`transforms.to_uint8`), scaled to [-1, 1] where they are used; the image file's (height, width) and the crop's
    (top, left) are what SDXL's micro-conditioning takes.
    `tokenizer` may be a pair (SDXL's two): the second one's ids are `input_ids_2`.

    With `data.buckets` it yields whole batches of `batch_size` examples of one aspect-ratio bucket each (use it
    with `DataLoader(batch_size=None)`): each reader keeps one buffer per bucket and yields a bucket's batch when
    it fills, so at most buckets x (batch_size - 1) examples wait in memory per reader. The batches follow from
    the reader's example order alone, so a resumed run that skips the batches already trained meets the same
    ones. A resampled stream's epoch is then num_samples // (readers x batch_size) batches per reader, the same
    for every process; a finite one drops each bucket's last, partial batch (counted).

    Each (process, worker) pair reads a disjoint part of the source; the order is a function of (seed, epoch,
    part, parts) only, so resume can replay it. With `data.cache` the parts are dealt the same every epoch (only
    the order within each part changes), so the samples a process encoded in the first epoch are the ones it meets
    again; without it each epoch deals anew. Call `set_epoch` before iterating each epoch.
    """

    def __init__(self, source, config: DataConfig, tokenizer, seed: int, rank: int = 0, world_size: int = 1,
                 batch_size: int | None = None):
        self.source, self.config, self.batch_size = source, config, batch_size
        # With data.sources each dataset reads with its own section (captions, filters, crops, masks) and entry.
        self.configs = source.configs if isinstance(source, MixedSource) else [config]
        self.entries = source.entries if isinstance(source, MixedSource) else None
        self.masks = any(section.masks for section in self.configs)
        # Each dataset's count name and fields (tensors shared by its samples; batching copies them).
        self._fields = [(f"dataset {e.name}", {"loss_weight": torch.tensor(e.loss_weight),
                                               "regularisation": torch.tensor(e.is_regularisation)})
                        for e in self.entries or []]
        if config.buckets and not batch_size:
            raise ValueError("data.buckets: the stream makes the batches, so it needs the batch size")
        self.buckets = ([tuple(size) for size in config.bucket_sizes] if config.bucket_sizes
                        else bucket_sizes(config.resolution, config.bucket_step)) if config.buckets else None
        self.tokenizers = tuple(tokenizer) if isinstance(tokenizer, (list, tuple)) else (tokenizer,)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # Too few shards for the readers: said here, in one line (from a dataloader worker it is a traceback).
        for each in source.sources if isinstance(source, MixedSource) else [source]:
            if hasattr(each, "check_readers"):
                each.check_readers(world_size * max(1, config.num_workers))
        self._epoch = multiprocessing.Value("q", 0, lock=False)  # shared, so persistent workers see set_epoch
        self.counts: Counter = Counter()  # in this process; dataloader workers report theirs through a queue
        self._worker_counts = multiprocessing.Queue()
        self._token_ids: dict[str, tuple[torch.Tensor, ...]] = {}  # caption -> ids per tokenizer, see `token_ids`

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def tokenize(self, captions: list[str], which: int = 0) -> torch.Tensor:
        return tokenize(self.tokenizers[which], captions)

    def token_ids(self, caption: str) -> dict[str, torch.Tensor]:
        """The token ids of one caption (`input_ids`, and `input_ids_2` from a second tokenizer), remembered for the
        next time it comes (up to 10,000 captions, then forgotten at once): data that repeats its captions (the
        built-in set, class-like captions, and the empty caption of caption dropout) skips the tokenizer, 0.15 ms a
        sample, a third of the built-in set's loading. The tensors are shared by every sample with that caption;
        batching copies them."""
        ids = self._token_ids.get(caption)
        if ids is None:
            if len(self._token_ids) >= 10_000:
                self._token_ids.clear()
            ids = self._token_ids[caption] = tuple(self.tokenize([caption], i)[0] for i in range(len(self.tokenizers)))
        return {"input_ids": ids[0], **({"input_ids_2": ids[1]} if len(ids) > 1 else {})}

    def _example(self, raw: RawSample, rng: random.Random) -> dict | None:
        """Filter, decode and transform one raw sample (with its dataset's settings); None (counted) when it is
        dropped or unreadable."""
        if raw.refused:  # before the filters: a refused path is always reported
            return self._bad(raw.key, "path outside the dataset folder", raw.refused)
        config = self.configs[raw.dataset]
        caption = pick_caption(raw.caption, rng) or config.default_caption
        dropped_by = failed_filter(raw.metadata, caption, config.filters)
        if dropped_by:
            self.counts[f"dropped by {dropped_by}"] += 1
            return None
        if raw.image is None or caption is None:
            return self._bad(raw.key, "no image" if raw.image is None else "no caption", "")
        try:
            image = decode_rgb(raw.image, config.max_image_pixels, min_size=self.config.resolution)
            size = (self.config.resolution,) * 2 if self.buckets is None else nearest_bucket(image.size, self.buckets)
            if size is None:  # (a filter's drop, not bad data: small images are common and nothing is wrong with them)
                self.counts["dropped: smaller than every bucket"] += 1
                return None
            mask = (decode_mask(raw.image, raw.mask, image.info["source_size"], config.max_image_pixels)
                    if config.masks else None)
            if mask is not None and mask.size != image.size:  # (a JPEG decoded at a reduced scale)
                mask = mask.resize(image.size, Image.Resampling.BILINEAR)
            pixels, crop, flipped, mask = crop_to(image, size, config.center_crop, config.random_flip, rng, mask)
        except Exception as error:  # noqa: BLE001 - any decoder failure means "unreadable", never a crash
            return self._bad(raw.key, unreadable_reason(error), error)
        (width, height), filters = image.info["source_size"], config.filters
        if (filters.min_width and width < filters.min_width) or (filters.min_height and height < filters.min_height):
            self.counts["dropped by min_width/min_height (decoded size)"] += 1
            return None
        caption = edit_caption(caption, config, rng)
        caption = "" if rng.random() < config.caption_dropout else caption
        self.counts["used"] += 1
        masked = {"mask": mask if mask is not None else torch.full((1, *pixels.shape[1:]), 255, dtype=torch.uint8)}
        return {"pixel_values": pixels, **self.token_ids(caption), "key": raw.key, "flipped": flipped,
                "original_size": torch.tensor([height, width]), "crop_top_left": torch.tensor(crop),
                **(masked if self.masks else {}), **self._mixing(raw.dataset)}

    def _mixing(self, dataset: int) -> dict:
        """With data.sources: the sample's loss weight and whether it is a regularisation image (counted by its
        dataset's name)."""
        if self.entries is None:
            return {}
        name, fields = self._fields[dataset]
        self.counts[name] += 1
        return fields

    def _bad(self, key: str, reason: str, detail) -> None:
        """Count a bad sample, log it (the first few of each reason, then every 100th), and stop the run when
        bad samples are more than `data.max_bad_fraction` of those read."""
        self.counts[f"skipped: {reason}"] += 1
        count = self.counts[f"skipped: {reason}"]
        if count <= 5 or count % 100 == 0:
            logger.warning("skipping sample %r (%s, %d so far)%s", key, reason, count, f": {detail}" if detail else "")
        self._check_bad_fraction(minimum=100)
        return None

    def _check_bad_fraction(self, minimum: int) -> None:
        """Raise when bad samples are more than `data.max_bad_fraction` of the (at least `minimum`) read."""
        bad = sum(v for k, v in self.counts.items() if k.startswith("skipped: "))
        seen = bad + self.counts["used"]
        if seen >= minimum and bad > self.config.max_bad_fraction * seen:
            raise RuntimeError(f"{bad} of the {seen} samples read so far are unreadable, more than "
                               f"data.max_bad_fraction={self.config.max_bad_fraction} ({dict(self.counts)}); check "
                               "the data (or raise data.max_bad_fraction)")

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        if worker:  # a worker counts this epoch only (a new one starts with a copy of the main process's totals)
            self.counts = Counter()
        part, parts = self.rank * num_workers + worker_id, self.world_size * num_workers
        resampled = getattr(self.source, "resampled", False)
        examples = self._examples(part, parts, RESAMPLED_GIVE_UP if resampled else None)
        if self.buckets:
            examples = self._bucket_batches(examples)
            share = self.config.num_samples // parts // self.batch_size if resampled else None
        else:
            share = self.config.num_samples // parts if resampled else None
        if resampled:  # an endless stream: the epoch is this reader's share of data.num_samples
            examples = itertools.islice(examples, share)
        yield from examples
        self._check_bad_fraction(minimum=20)  # the whole part read: judge it unless it is tiny
        if worker:  # hand this epoch's counts to the main process (collect_counts)
            self._worker_counts.put(dict(self.counts))

    def _bucket_batches(self, examples: Iterator[dict]) -> Iterator[dict]:
        """Batches of one bucket each, in the order their buckets fill; a finite epoch's partial batches are
        dropped and counted."""
        waiting: dict[tuple[int, int], list[dict]] = {}
        for example in examples:
            bucket = waiting.setdefault(tuple(example["pixel_values"].shape[:0:-1]), [])
            bucket.append(example)
            if len(bucket) == self.batch_size:
                self.counts[f"bucket {example['pixel_values'].shape[2]}x{example['pixel_values'].shape[1]}"] += \
                    self.batch_size
                yield default_collate(bucket)
                bucket.clear()
        left = sum(len(bucket) for bucket in waiting.values())
        if left:
            self.counts["dropped: a bucket's partial batch at the end of the epoch"] += left

    def raw_samples(self, part: int, parts: int) -> Iterator[RawSample]:
        """Reader `part`'s raw samples of this epoch, in the source's order (before the shuffle buffer). With
        `data.cache` the units are dealt by a generator of the seed alone, the same every epoch, so that the cache
        of the process hits from the second epoch on (dealt anew each epoch, a process would meet about
        1/processes of what it cached); without it, by this epoch's generator, so the readers' parts mix anew."""
        order_rng = random.Random(f"order-{self.seed}-{self.epoch}")
        if not self.config.cache:
            return self.source.samples(order_rng, part, parts, self.counts)
        return self.source.samples(order_rng, part, parts, self.counts, deal_rng=random.Random(f"deal-{self.seed}"))

    def _examples(self, part: int, parts: int, give_up: int | None) -> Iterator[dict]:
        """Reader `part`'s examples of this epoch, through a seeded shuffle buffer. An endless source that gives
        no example in `give_up` samples in a row (every one filtered out or unreadable) is an error."""
        rng = random.Random(f"sample-{self.seed}-{self.epoch}-{part}")
        buffer: list[RawSample] = []
        attempts, used = 0, self.counts["used"]
        for raw in self.raw_samples(part, parts):
            if len(buffer) < self.config.shuffle_buffer:
                buffer.append(raw)
                continue
            if buffer:  # (no buffer: shuffle_buffer 0 keeps the shard order)
                index = rng.randrange(len(buffer))
                buffer[index], raw = raw, buffer[index]
            example = self._example(raw, rng)
            attempts += 1
            if give_up and attempts % give_up == 0:
                if self.counts["used"] == used:
                    raise RuntimeError(f"{give_up} samples in a row gave no training example "
                                       f"({dict(self.counts)}); check data.path and data.filters")
                used = self.counts["used"]
            if example is not None:
                yield example
        rng.shuffle(buffer)
        for raw in buffer:
            example = self._example(raw, rng)
            if example is not None:
                yield example

    def collect_counts(self, num_workers: int) -> Counter:
        """The counts so far, all epochs, with those of the `num_workers` dataloader workers that just finished
        an epoch added in (each reports once per epoch it read to the end)."""
        for _ in range(num_workers):
            self.counts.update(self._worker_counts.get(timeout=60))
        return self.counts
