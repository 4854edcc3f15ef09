"""Read a kohya sd-scripts dataset config (`data.kohya_toml`) into this project's data section.

kohya's TOML (https://github.com/kohya-ss/sd-scripts/blob/main/docs/config_README-en.md) has `[general]` keys for
every dataset, `[[datasets]]` with their own batch size, resolution and buckets, and `[[datasets.subsets]]`, each a
folder of images (`image_dir`) with caption files beside them; a key set on a subset wins over its dataset's, which
wins over `[general]`. Each subset becomes one entry of `data.sources` (an imagefolder). The run-wide keys
(resolution, buckets, batch size) must agree between datasets, since here every batch is drawn from all of them.

Regularisation subsets (`is_reg`) are balanced as kohya balances them: an epoch holds as many regularisation
images as training images (with their repeats) of the same dataset, shared between its regularisation folders by
their images x repeats. A key that cannot be carried over is refused by name, never dropped.
"""

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..config import ConfigError
from .tables import SidecarFolderSource

# kohya subset key -> (data.sources entry key, how the value becomes ours)
SUBSET_KEYS = {
    "image_dir": ("path", None),
    "num_repeats": ("repeats", None),
    "is_reg": ("is_regularisation", None),
    "class_tokens": ("default_caption", None),
    "caption_extension": ("caption_extension", lambda ext: ext if str(ext).startswith(".") else f".{ext}"),
    "caption_dropout_rate": ("caption_dropout", None),
    "shuffle_caption": ("shuffle_caption", None),
    "keep_tokens": ("keep_tokens", None),
    "caption_prefix": ("caption_prefix", None),
    "caption_suffix": ("caption_suffix", None),
    "flip_aug": ("random_flip", None),
    "random_crop": ("center_crop", lambda crop: not crop if isinstance(crop, bool) else crop),
    "alpha_mask": ("masks", None),
}  # (None: as it is; the config loader checks the types and names the entry's key)
# kohya dataset key -> (section, key, how the value becomes ours): the same for every dataset here
DATASET_KEYS = {
    "batch_size": ("train", "train_batch_size", None),
    "resolution": ("data", "resolution", lambda size: size if isinstance(size, int) else _square(size)),
    "enable_bucket": ("data", "buckets", None),
    "bucket_reso_steps": ("data", "bucket_step", None),
}
# kohya's defaults where they differ from this project's
KOHYA_DEFAULTS = {"caption_extension": ".caption", "caption_dropout": 0.0, "default_caption": ""}  # (kohya
# trains an image without a caption file or class_tokens on the empty caption)
WHY_NOT = {
    "metadata_file": "kohya's fine-tuning metadata JSON; write a metadata.jsonl (file_name, text) in the folder and "
                     "give it as an imagefolder entry of data.sources",
    "conditioning_data_dir": "ControlNet data is not trained here",
    "bucket_no_upscale": "buckets here never enlarge an image (bucket_no_upscale = true); remove the key",
    "min_bucket_reso": "list the buckets in data.bucket_sizes instead",
    "max_bucket_reso": "list the buckets in data.bucket_sizes instead",
}


def _square(size) -> int:
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1] and isinstance(size[0], int):
        return size[0]
    raise ValueError(f"resolution {size!r}: only a square resolution carries over (data.resolution is the side of a "
                     "square; with enable_bucket the buckets have its area)")


def read(path: str) -> tuple[dict, dict]:
    """The data-section keys (with `sources`) and the train-section keys that the kohya TOML at `path` sets."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"data.kohya_toml: {path}: no such file"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError([f"data.kohya_toml: {path} is not TOML ({error})"]) from None
    problems: list[str] = []
    unknown = sorted(set(document) - {"general", "datasets"})
    if unknown:
        problems.append(f"data.kohya_toml: top-level {unknown}: not a kohya dataset config key (it has [general] and "
                        "[[datasets]])")
    general, datasets = document.get("general", {}), document.get("datasets", [])
    if not isinstance(general, dict) or not _tables(datasets) or not datasets:
        raise ConfigError(problems + [f"data.kohya_toml: {path} needs [[datasets]] tables (each with "
                                      "[[datasets.subsets]]) and at most one [general] table"])
    data, train, sources, set_by = {}, {}, [], {}
    for d, dataset in enumerate(datasets):
        shared = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        subsets = dataset.get("subsets", [])
        if not _tables(subsets) or not subsets:
            problems.append(f"data.kohya_toml: datasets[{d}] needs [[datasets.subsets]] tables")
            continue
        for key, (section, ours, convert) in DATASET_KEYS.items():
            _run_wide(d, key, shared.get(key), section, ours, convert, train if section == "train" else data,
                      set_by, problems)
        prior_loss_weight = shared.pop("prior_loss_weight", None)
        entries = []
        for s, subset in enumerate(subsets):
            where = f"data.kohya_toml: datasets[{d}].subsets[{s}]"
            settings = {k: v for k, v in shared.items() if k not in DATASET_KEYS} | subset
            entry = {"source": "imagefolder", "name": f"{d}-{s}-{Path(str(subset.get('image_dir', ''))).name}",
                     **KOHYA_DEFAULTS}
            for key, value in settings.items():
                if key not in SUBSET_KEYS:
                    why = WHY_NOT.get(key, "this importer does not carry it over")
                    problems.append(f"{where}.{key}: {why}; remove it from the TOML, or set what it does in the YAML "
                                    "config (README: Several datasets in one run)")
                    continue
                ours, convert = SUBSET_KEYS[key]
                entry[ours] = convert(value) if convert else value
            repeats = entry.get("repeats", 1)
            if "path" not in entry or not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1 or \
                    not isinstance(entry.get("is_regularisation", False), bool):
                problems.append(f"{where}: needs an image_dir, num_repeats an integer >= 1 (kohya skips a subset "
                                "with less; leave it out instead) and is_reg true or false")
                continue
            if entry.get("is_regularisation") and prior_loss_weight is not None:
                entry["loss_weight"] = prior_loss_weight  # (kohya's --prior_loss_weight, also taken in the TOML)
            entries.append(entry)
        sources += _balance(d, entries, problems)
    if not sources and not problems:
        problems.append(f"data.kohya_toml: {path} gives no dataset to train on")
    if problems:
        raise ConfigError(problems)
    data["sources"] = sources
    return data, train


def _tables(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _run_wide(d: int, key: str, value, section: str, ours: str, convert, target: dict, set_by: dict,
              problems: list[str]) -> None:
    """A dataset's run-wide key into `target`: every dataset must give the same value, or none give it."""
    if value is not None:
        try:
            value = convert(value) if convert else value
        except ValueError as error:
            problems.append(f"data.kohya_toml: datasets[{d}].{key}: {error}")
            return
    first = set_by.setdefault(key, (d, value))
    if first[1] != value:
        problems.append(f"data.kohya_toml: datasets[{d}].{key} = {value!r} but datasets[{first[0]}].{key} = "
                        f"{first[1]!r}; here every batch draws from all datasets, so they share {section}.{ours}: "
                        "give them the same")
    elif value is not None:
        target[ours] = value


def _balance(d: int, entries: list[dict], problems: list[str]) -> list[dict]:
    """kohya's regularisation balance within one dataset (`DreamBoothDataset`): its regularisation images are
    registered in order, each with its folder's repeats, until they reach the training images x repeats; short of
    that, every one gets one repeat more per round until they do. The samples each regularisation folder gets so are
    its `samples_per_epoch` (drawn anew each epoch here, where kohya keeps the first images)."""
    regs = [e for e in entries if e.get("is_regularisation")]
    if not regs:
        return entries
    try:
        sizes = [SidecarFolderSource(e["path"], e.get("caption_extension", ".txt")).num_samples for e in entries]
    except FileNotFoundError as error:
        problems.append(f"data.kohya_toml: datasets[{d}]: {error}")
        return []
    trained = sum(size * e.get("repeats", 1) for e, size in zip(entries, sizes) if e not in regs)
    if not trained:
        problems.append(f"data.kohya_toml: datasets[{d}] has regularisation subsets only; kohya balances them "
                        "against the dataset's training images, so give it a subset with is_reg = false")
        return []
    size_of = {id(e): size for e, size in zip(entries, sizes)}
    images = [(i, repeats) for i, (e, repeats) in enumerate([(e, e.pop("repeats", 1)) for e in regs])
              for _ in range(size_of[id(e)])]  # (in kohya's order: folder by folder)
    counts, total, first = [0] * len(regs), 0, True
    while total < trained:
        for i, repeats in images:
            step = repeats if first else 1
            counts[i], total = counts[i] + step, total + step
            if total >= trained:
                break
        first = False
    for entry, count in zip(regs, counts):
        entry["samples_per_epoch"] = count
    return [e for e in entries if e.get("samples_per_epoch", 1) > 0]


def expand(raw: dict) -> dict:
    """`raw` (a config as read from YAML, overrides applied) with `data.kohya_toml` read into it: the TOML's keys
    first, the YAML's own on top (an override such as data.resolution=64 still wins), `data.sources` from the TOML
    alone; `data.kohya_toml` is then cleared, so the resolved config.yaml holds the result."""
    section = raw.get("data")
    if not isinstance(section, dict) or not section.get("kohya_toml"):
        return raw
    if section.get("sources"):
        raise ConfigError(["data.kohya_toml: data.sources are read from it; remove data.sources (or the TOML)"])
    data, train = read(section["kohya_toml"])
    from .mixing import MIX_ONLY, RUN_WIDE

    per_dataset = {k: v for k, v in section.items() if k not in RUN_WIDE and k not in MIX_ONLY}
    for entry in data["sources"]:  # a per-dataset key of the YAML's data section (caption_dropout, filters, ...)
        entry.update(per_dataset)
    raw["data"] = {**data, **{k: v for k, v in section.items() if k not in per_dataset},
                   "sources": data["sources"], "kohya_toml": None}
    raw["train"] = {**train, **(raw.get("train") or {})}
    return raw
