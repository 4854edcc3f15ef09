"""The data section and its filters: where the image-text pairs come from and how they become tensors."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .building import _build
from .errors import ConfigError, _check


@dataclass
class FilterConfig:
    """LAION metadata filters: a sample whose metadata fails one is dropped before decoding."""

    min_width: int | None = None
    """Drop images narrower than this (pixels)."""
    min_height: int | None = None
    """Drop images shorter than this (pixels)."""
    max_pwatermark: float | None = None
    """Drop samples whose watermark probability is above this."""
    max_punsafe: float | None = None
    """Drop samples whose NSFW probability is above this."""
    min_aesthetic: float | None = None
    """Drop samples whose aesthetic score is below this."""
    min_similarity: float | None = None
    """Drop samples whose CLIP image-text similarity is below this."""
    min_caption_chars: int | None = None
    """Drop samples whose caption is shorter than this many characters."""
    max_caption_chars: int | None = None
    """Drop samples whose caption is longer than this many characters."""
    on_missing: Literal["keep", "drop"] = "keep"
    """A sample whose metadata lacks a field that a set filter needs: `keep` it or `drop` it (counted)."""

    def __post_init__(self):
        problems = []
        for name in ("max_pwatermark", "max_punsafe"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                problems.append(f"data.filters.{name}: got {value}; must be a probability in [0, 1]")
        for name in ("min_width", "min_height", "min_caption_chars", "max_caption_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"data.filters.{name}: got {value}; must be >= 1")
        if (self.min_caption_chars or 0) > (self.max_caption_chars or float("inf")):
            problems.append(f"data.filters.min_caption_chars={self.min_caption_chars} is above "
                            f"max_caption_chars={self.max_caption_chars}: no caption could pass")
        _check(problems)


@dataclass
class DataConfig:
    """Where the image-text pairs come from and how they become tensors."""

    source: Literal["builtin", "webdataset", "imagefolder", "hf", "parquet"] = "builtin"
    """`builtin`: the rendered-shapes set (written on first use); `webdataset`: tar shards; `imagefolder`: a
    folder of images with `metadata.jsonl` / `metadata.csv` (the HF imagefolder layout) or with a `.txt` caption
    beside each image; `hf`: a HF datasets dataset (saved with `save_to_disk`, or a name for `load_dataset`);
    `parquet`: parquet files with image bytes (or paths) and captions."""
    path: str | None = None
    """builtin: the folder to write/read it (default: ~/.cache/finetune/shapes); webdataset: a shard path, brace
    pattern (`shards-{000000..000009}.tar`) or URL; imagefolder: the folder; hf: a saved dataset's folder or a
    dataset name; parquet: a file, a folder of `*.parquet` or a glob."""
    num_samples: int | None = None
    """builtin: how many samples to generate, the epoch length (null: 6000); webdataset / builtin with
    `resampled: true`: the training examples per epoch, over all processes (required there). Other sources
    have an epoch of one pass and take no number."""
    resampled: bool = False
    """webdataset / builtin: draw shards at random with replacement, endlessly (open_clip's
    `--dataset-resampled`): each reader draws its own shards, so an epoch is `num_samples` examples rather
    than one pass, and a sample may come twice in an epoch. For streams too large to finish an epoch."""
    colors: list[str] | None = None
    """builtin: the colours to draw (of red, orange, yellow, green, blue, purple; one listed twice is drawn twice
    as often); null: every colour but purple, which is held out for the LoRA fine-tuning demo."""
    cache: bool = False
    """Encode each image with the frozen VAE and each caption with the frozen text encoder once, keep the results
    in memory and train from them (the same training, without the repeated encoder passes). Needs centre crops
    (center_crop true); with random_flip each orientation is encoded once (a flipped image's latent is not the
    flipped latent). The text is cached only while the text encoder is frozen."""
    cache_dir: str | None = None
    """With `cache`: keep the encodings in this folder instead of in memory (one safetensors file per encoded image
    or caption, named by a hash of its pixels or token ids, under a folder per encoder's weights), so memory stays
    bounded at any dataset size and the next run on the same data and base reuses them. Each process writes its
    own; no sample keys needed (streamed data too)."""
    resolution: int = 32
    """Images are resized (shorter side) and cropped to this square size (with `buckets`, the side of the square
    whose area the buckets have)."""
    buckets: bool = False
    """Aspect-ratio buckets: each image goes to the bucket nearest its aspect ratio among those it contains
    (about resolution x resolution pixels; images are never enlarged), is resized to cover it and cropped
    minimally, and every batch holds images of one bucket. An image smaller than every bucket is dropped (counted,
    like a filter's drop; data.filters.min_width/min_height drop small images before decoding); a bucket's leftover
    images at the end of a finite epoch are dropped (counted). With several
    processes the data must be `resampled` (every reader then yields the same number of batches)."""
    bucket_sizes: list[list[int]] | None = None
    """The buckets, as [width, height] pairs (sides multiples of 8); null: for each height that is a multiple of
    `bucket_step`, the widest width (also a multiple) that keeps the area within resolution^2, sides at most 4:1,
    and the same lying down (at 1024 px, 17 buckets: 512x2048, 576x1792, ..., 1024x1024, ..., 2048x512)."""
    bucket_step: int = 64
    """The multiple that computed bucket sides are rounded down to (a multiple of 8, the VAE's factor)."""
    center_crop: bool = True
    """Crop the centre; false crops at a random position."""
    random_flip: bool = False
    """Flip half of the images horizontally."""
    masks: bool = False
    """Weight the loss per pixel by a mask: a `<key>.mask.png` beside the image in webdataset shards, else the
    image's own alpha channel (white / opaque counts fully, black / transparent by `train.unmasked_weight`); it
    is resized, cropped and flipped with its image. Images with neither train everywhere."""
    caption_dropout: float = 0.1
    """Share of captions replaced by the empty caption, so the model also learns the unconditional
    prediction that classifier-free guidance needs."""
    caption_prefix: str = ""
    """Put before every caption, with a space: an instance token ("sks dog"), a trigger word or a style tag."""
    caption_suffix: str = ""
    """Put after every caption, with a space."""
    shuffle_caption: bool = False
    """Shuffle a caption's comma-separated tags each time it is read (tag-style captions, as kohya's
    shuffle_caption), keeping the first `keep_tokens` tags (the prefix counts as the first) in place."""
    keep_tokens: int = 0
    """With shuffle_caption: how many leading comma-separated tags stay first."""
    default_caption: str | None = None
    """The caption of an image that has none (kohya's class_tokens: "sks dog" for a folder of one subject);
    null: such an image is skipped and counted as bad data."""
    caption_extension: str = ".txt"
    """imagefolder without a metadata file: the extension of the caption file beside each image (kohya's
    DreamBooth folders use `.caption`)."""
    caption_column: str = "text"
    """imagefolder / hf / parquet: the column holding the caption (a string or a list of them); webdataset: the
    json field used when a sample has no `.txt`."""
    image_column: str = "image"
    """hf / parquet: the column holding the image (bytes, an HF image, or a path). imagefolder metadata names each
    image in its `file_name` column."""
    split: str = "train"
    """hf: the split to train on."""
    streaming: bool = False
    """hf: stream the dataset instead of loading it (for sets larger than the disk or memory allows)."""
    shuffle_buffer: int = 1000
    """webdataset/builtin: samples held in the shuffle buffer."""
    num_workers: int = 0
    """DataLoader worker processes (0 decodes in the training process)."""
    persistent_workers: bool = False
    """Keep the DataLoader workers alive between epochs (saves their start-up each epoch)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """LAION metadata filters."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels than this (read from the header, before decoding) are skipped as decompression
    bombs; Pillow's own limit by default. Set higher, Pillow's limit is raised to it for these decodes only."""
    allow_outside_paths: bool = False
    """parquet / imagefolder: read image paths (in a parquet cell or the `file_name` of `metadata.jsonl` /
    `metadata.csv`) that lead outside the dataset's folder: absolute, climbing out with `..`, or through a
    symlink. Off by default because the data then chooses which files training reads, and a table from elsewhere
    could name any file this user can read; such a row is skipped with a warning and counted as a bad sample.
    Turn it on for trusted data whose images live elsewhere."""
    allow_pipe_urls: bool = False
    """webdataset: open `pipe:` shard URLs (`pipe:aws s3 cp s3://bucket/00000.tar -`), which webdataset runs as
    shell commands. Off by default because a data path (often pasted, generated or shared in a config) should not
    run commands on the training machines: a `pipe:` shard is then refused when the source is built. Turn it on
    for commands you wrote."""
    max_bad_fraction: float = 0.1
    """Stop with an error when more than this share of the samples read (after the first 100) is unreadable:
    a few bad samples are skipped, a broken dataset is not trained on."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Several datasets in one run, each a mapping of data-section keys of its own (`source` required; `path`,
    captions, filters, masks, crops; the others are inherited from this section) and how it takes part: `name`,
    `repeats` (passes an epoch) or `samples_per_epoch`, `loss_weight`, `is_regularisation`. Run-wide keys
    (resolution, buckets, cache, workers, shuffle buffer) stay in this section. The start-up summary gives each
    dataset's samples per epoch and the epoch's data counts give what each gave (`dataset <name>`)."""
    kohya_toml: str | None = None
    """A kohya sd-scripts dataset config (`[[datasets]]` / `[[datasets.subsets]]`) to read data.sources (and the
    resolution, buckets and batch size) from; the resolved config.yaml holds the result. Keys it cannot carry over
    are refused by name."""

    def __post_init__(self):
        problems = []
        if self.source != "builtin" and not self.path and not self.sources:
            problems.append(f"data.path: required when data.source={self.source!r}; give the shards, folder, files "
                            "or dataset name")
        if self.resolution < 8 or self.resolution % 8:
            problems.append(f"data.resolution: got {self.resolution}; must be a multiple of 8, at least 8")
        if self.max_image_pixels < 1 or not 0 <= self.max_bad_fraction <= 1:
            problems.append("data.max_image_pixels must be >= 1 and data.max_bad_fraction in [0, 1]")
        if not 0 <= self.caption_dropout < 1:
            problems.append(f"data.caption_dropout: got {self.caption_dropout}; must be in [0, 1)")
        if self.num_samples is not None and self.num_samples < 1:
            problems.append(f"data.num_samples: got {self.num_samples}; must be >= 1")
        if self.resampled and self.source not in ("webdataset", "builtin"):
            problems.append(f"data.resampled: only webdataset shards are resampled (got data.source={self.source!r})")
        if self.resampled and self.num_samples is None:
            problems.append("data.num_samples: needed with data.resampled: true (a resampled stream never ends, so "
                            "it sets the epoch length); e.g. the number of samples in the shards")
        if self.num_samples is not None and self.source != "builtin" and not self.resampled:
            problems.append(f"data.num_samples: an epoch of {self.source} data is one pass over it; remove "
                            "data.num_samples, or set data.resampled: true (webdataset) for epochs of that length")
        if self.shuffle_buffer < 0 or self.num_workers < 0:
            problems.append("data.shuffle_buffer and data.num_workers must be >= 0")
        if self.colors is not None:
            from ..data.shapes import HUES  # here, not at the top: the data package imports this module

            if not self.colors or any(c not in HUES for c in self.colors):
                problems.append(f"data.colors: got {self.colors}; give some of {', '.join(HUES)}")
            if self.source != "builtin":
                problems.append("data.colors: only the builtin source draws colours; remove it")
        if self.persistent_workers and not self.num_workers:
            problems.append("data.persistent_workers: true needs data.num_workers >= 1 (there are no workers to keep)")
        if self.source != "hf" and (self.streaming or self.split != "train"):
            problems.append(f"data.streaming / data.split: only data.source: hf reads them (got {self.source!r})")
        if self.allow_outside_paths and self.source not in ("parquet", "imagefolder"):
            problems.append(f"data.allow_outside_paths: only parquet and imagefolder data name image paths (got "
                            f"data.source={self.source!r}); remove it")
        if self.allow_pipe_urls and self.source != "webdataset":
            problems.append(f"data.allow_pipe_urls: only webdataset shards are opened by URL (got "
                            f"data.source={self.source!r}); remove it")
        if self.cache_dir and not self.cache:
            problems.append("data.cache_dir: set data.cache: true to use it, or remove it")
        if self.cache and self.streaming and not self.cache_dir:
            problems.append("data.cache: a streamed dataset has no stable sample keys to cache by in memory; set "
                            "data.cache_dir (the disk cache names images by their pixels), data.cache: false or "
                            "data.streaming: false")
        sizes = self.bucket_sizes or []
        if any(len(size) != 2 or min(size) < 8 or size[0] % 8 or size[1] % 8 for size in sizes):
            problems.append(f"data.bucket_sizes: got {self.bucket_sizes}; give [width, height] pairs whose sides are "
                            "multiples of 8 (the VAE's factor), at least 8")
        if self.bucket_step < 8 or self.bucket_step % 8:
            problems.append(f"data.bucket_step: got {self.bucket_step}; must be a multiple of 8 (the VAE's factor)")
        if self.buckets and not self.bucket_sizes and self.resolution < self.bucket_step:
            problems.append(f"data.bucket_step: {self.bucket_step} is more than data.resolution={self.resolution}, so "
                            "no bucket fits the area; lower data.bucket_step (a multiple of 8) or list "
                            "data.bucket_sizes")
        if (self.bucket_sizes is not None) and not self.buckets:
            problems.append("data.bucket_sizes: set data.buckets: true to use them, or remove them")
        if self.caption_extension != ".txt" and self.source != "imagefolder":
            problems.append(f"data.caption_extension: only imagefolder data without a metadata file reads caption "
                            f"files (got data.source={self.source!r}); remove it")
        if self.keep_tokens < 0 or not self.caption_extension.startswith("."):
            problems.append(f"data.keep_tokens (got {self.keep_tokens}) must be >= 0 and data.caption_extension (got "
                            f"{self.caption_extension!r}) start with a dot")
        if self.sources:
            from ..data.mixing import entries  # here, not at the top: the data package imports this module

            try:
                entries(self)
            except ConfigError as error:
                problems.extend(error.problems)
        if self.cache and not self.center_crop:
            problems.append("data.cache: the cache stores one encoding per image (and orientation), so random crops "
                            "would be frozen; set data.center_crop: true, or data.cache: false")
        _check(problems)



def held_out_section(data: DataConfig, loss_data: dict) -> DataConfig:
    """The held-out data of `validation.loss_data`: the run's data section with those keys in place (checked as the
    data section is; a ConfigError names `validation.loss_data.<key>`), read once over, never resampled."""
    if data.sources and "source" not in loss_data:
        raise ConfigError(["validation.loss_data.source: with data.sources the held-out data names its own source "
                           "(and path), e.g. {source: imagefolder, path: val}"])
    merged = {**dataclasses.asdict(data), "sources": [], "kohya_toml": None, **loss_data}
    if merged.get("source") != "builtin":
        merged.update(resampled=False, num_samples=None)
    problems: list[str] = []
    held_out = _build(DataConfig, merged, "validation.loss_data", problems)
    _check(problems)
    return held_out
