"""Several datasets in one run (`data.sources`): each entry is a dataset of its own (source, path, captions, filters)
with how much of it an epoch holds (`repeats`, or `samples_per_epoch`), how much its samples weigh in the loss
(`loss_weight`) and whether they are regularisation images (`is_regularisation`, logged apart).

`MixedSource` is a source like the others: it yields reader `part`'s raw samples of one epoch, each dataset dealt
over the readers on its own (so every process sees a disjoint part of each), its passes in orders drawn from this
epoch's generator, interleaved by a seeded draw that spreads every dataset over the whole epoch. Everything is a
function of (seed, epoch, part, parts), so a resumed run replays the same stream and skips what it trained.
"""

import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, DataConfig

# The keys every dataset shares: they shape the batch (size, buckets) or the reading (cache, workers, shuffle buffer).
RUN_WIDE = ("resolution", "buckets", "bucket_sizes", "bucket_step", "cache", "cache_dir", "shuffle_buffer",
            "num_workers", "persistent_workers", "max_bad_fraction", "sources", "kohya_toml")


# The data section's keys that each dataset must name itself (refused in the data section with data.sources).
MIX_ONLY = ("source", "path", "resampled", "num_samples")


@dataclass
class SourceEntry:
    """How one dataset of `data.sources` takes part (the entry's other keys are data-section keys of its own)."""

    name: str = ""
    """A short name for the logs and the per-dataset counts (default: the folder or file name of its path)."""
    repeats: int = 1
    """Passes over this dataset in each epoch (kohya's num_repeats): a dataset of 20 images with repeats 10 gives
    200 samples an epoch, as many as one of 200."""
    samples_per_epoch: int | None = None
    """Instead of repeats: exactly this many samples of it each epoch (its passes go on, each in a new order, until
    the number is reached; the last pass is cut short). A dataset's weight in the mix, for any size."""
    loss_weight: float = 1.0
    """Each of its samples' loss is multiplied by this (DreamBooth's prior_loss_weight on regularisation images)."""
    is_regularisation: bool = False
    """Regularisation images (DreamBooth's class images): their loss is logged apart, as loss_regularisation."""


def entries(data: DataConfig) -> list[tuple[DataConfig, SourceEntry]]:
    """Each `data.sources` entry as its own data section (the run's keys, with the entry's in their place) and its
    `SourceEntry`. Every problem is collected and raised once, named `data.sources[i].<key>`."""
    from ..config import _build  # (the loader's builder: the same typing and messages as the rest of the config)

    problems: list[str] = []
    built = []
    base = {**dataclasses.asdict(data), "sources": [], "kohya_toml": None}
    entry_keys = [f.name for f in dataclasses.fields(SourceEntry)]
    for i, raw in enumerate(data.sources):
        where = f"data.sources[{i}]"
        shared = sorted(set(raw) & set(RUN_WIDE))
        if shared:
            problems.append(f"{where}: {', '.join(shared)} cannot differ between datasets (they shape every batch or "
                            "the reading); set them once in the data section")
        if "source" not in raw:
            problems.append(f"{where}.source: required in every entry (builtin, webdataset, imagefolder, hf or "
                            "parquet)")
        mix = {k: v for k, v in raw.items() if k in entry_keys}
        own = {k: v for k, v in raw.items() if k not in entry_keys and k not in RUN_WIDE}
        if isinstance(own.get("filters"), dict):  # an entry's filters add to the data section's
            own["filters"] = {**base["filters"], **own["filters"]}
        entry = _build(SourceEntry, mix, where, problems)
        section = DataConfig()
        try:
            section = _build_section(base, own, where)
        except ConfigError as error:  # an unknown key: name the entry's own keys too
            problems.extend(p + f" (or an entry's own: {', '.join(entry_keys)})" if "unknown key" in p else p
                            for p in error.problems)
        problems.extend(_check_entry(entry, section, where))
        built.append((section, dataclasses.replace(entry, name=entry.name or _default_name(section, i))))
    names = [entry.name for _, entry in built]
    if len(set(names)) < len(names):
        problems.append(f"data.sources: names {names} repeat; give each entry a `name` of its own")
    moved = [f"data.{key}" for key in MIX_ONLY if getattr(data, key) != getattr(DataConfig, key)]
    if moved:
        problems.append(f"{', '.join(moved)}: with data.sources each dataset names its own; move them into the "
                        "entries (or remove them)")
    if data.sources and all(entry.is_regularisation for _, entry in built):
        problems.append("data.sources: every dataset is is_regularisation; at least one must be the data to learn")
    if problems:
        raise ConfigError(problems)
    return built


def _build_section(base: dict, own: dict, where: str) -> DataConfig:
    from ..config import _build

    problems: list[str] = []
    section = _build(DataConfig, {**base, **own}, "data", problems)
    if problems:
        raise ConfigError([p.replace("data.", f"{where}.", 1) if p.startswith("data.") else f"{where}: {p}"
                           for p in problems])
    return section


def _check_entry(entry: SourceEntry, section: DataConfig, where: str) -> list[str]:
    problems = []
    if entry.repeats < 1:
        problems.append(f"{where}.repeats: got {entry.repeats}; must be >= 1 (leave a dataset out to use none of it)")
    if entry.samples_per_epoch is not None:
        if entry.samples_per_epoch < 1:
            problems.append(f"{where}.samples_per_epoch: got {entry.samples_per_epoch}; must be >= 1")
        if entry.repeats != 1:
            problems.append(f"{where}: give repeats or samples_per_epoch, not both")
    if section.resampled and (entry.repeats != 1 or entry.samples_per_epoch is not None):
        problems.append(f"{where}: a resampled dataset's share of an epoch is its num_samples; remove repeats / "
                        "samples_per_epoch")
    if not entry.loss_weight >= 0:  # (NaN too)
        problems.append(f"{where}.loss_weight: got {entry.loss_weight}; must be >= 0")
    return problems


def _default_name(section: DataConfig, index: int) -> str:
    if section.source == "builtin" or not section.path:
        return f"{section.source}-{index}"
    first = Path(section.path.rstrip("/").split("::")[0])  # (a shard pattern: its folder's name)
    return first.name.split("{")[0].split("*")[0].rstrip("-_.") or first.parent.name or f"dataset-{index}"


def share(count: int, part: int, parts: int) -> int:
    """Reader `part`'s share of `count` samples: the counts of all `parts` readers add up to `count`."""
    return count // parts + (part < count % parts)


class MixedSource:
    """The datasets of `data.sources`, read as one source (see the module's docstring). `configs[i]` and
    `entries[i]` are dataset i's data section and entry; each raw sample it yields carries its dataset's index."""

    resampled = False  # (each resampled dataset is cut to its share: the mix is finite)

    def __init__(self, datasets: list[tuple[DataConfig, SourceEntry]], sources: list):
        self.configs = [section for section, _ in datasets]
        self.entries = [entry for _, entry in datasets]
        self.sources = sources
        planned = self.planned()
        self.num_samples = sum(planned) if None not in planned else None

    def planned(self) -> list[int | None]:
        """Samples each dataset gives an epoch (before filters and unreadable samples): its size x repeats, its
        samples_per_epoch, or a resampled one's num_samples; None for a stream of unknown size."""
        counts = []
        for section, entry, source in zip(self.configs, self.entries, self.sources):
            if entry.samples_per_epoch is not None:
                counts.append(entry.samples_per_epoch)
            elif section.resampled:
                counts.append(section.num_samples)
            else:
                size = getattr(source, "num_samples", None)
                counts.append(None if size is None else size * entry.repeats)
        return counts

    def describe(self) -> str:
        """One line per dataset for the start-up summary: what an epoch takes from it, and how it is weighed."""
        lines = []
        for section, entry, planned, source in zip(self.configs, self.entries, self.planned(), self.sources):
            size = getattr(source, "num_samples", None)
            how = (f"{entry.samples_per_epoch} samples an epoch" if entry.samples_per_epoch is not None
                   else f"{planned} samples an epoch (resampled)" if section.resampled
                   else f"{size} x {entry.repeats} = {planned} samples an epoch" if size is not None
                   else f"{entry.repeats} pass(es) of a stream of unknown size")
            extra = (", regularisation" if entry.is_regularisation else "") + \
                (f", loss weight {entry.loss_weight:g}" if entry.loss_weight != 1 else "")
            lines.append(f"  {entry.name}: {section.source} {section.path or ''} - {how}{extra}")
        return "\n".join(lines)

    def samples(self, order_rng: random.Random, part: int, parts: int, counts: Counter,
                deal_rng: random.Random | None = None) -> Iterator:
        """Reader `part`'s raw samples of this epoch, every dataset's interleaved. Each dataset is dealt with a
        generator of its own (from `deal_rng` when given: then the same every epoch), and each of its passes is
        read in an order of its own; a seeded draw, each dataset weighted by what it has left, picks which comes
        next, so a small dataset is spread over the epoch rather than bunched."""
        base = order_rng.random()
        deal_base = deal_rng.random() if deal_rng is not None else None
        streams, left, planned_counts = [], [], self.planned()
        for i, (source, section, entry) in enumerate(zip(self.sources, self.configs, self.entries)):
            limit = (share(entry.samples_per_epoch, part, parts) if entry.samples_per_epoch is not None
                     else share(section.num_samples, part, parts) if section.resampled else None)
            streams.append(self._dataset(i, source, entry, limit, base, deal_base, part, parts, counts))
            planned = planned_counts[i]
            left.append(limit if limit is not None else None if planned is None else max(1, planned // parts))
        known = [n for n in left if n is not None]
        left = [n if n is not None else max(known, default=1) for n in left]  # a stream of unknown size: as the largest
        draw = random.Random(f"{base}-mix")
        live = list(range(len(streams)))
        while live:
            index = draw.choices(range(len(live)), weights=[left[i] for i in live])[0]
            i = live[index]
            raw = next(streams[i], None)
            if raw is None:
                live.pop(index)
                continue
            left[i] = max(1, left[i] - 1)
            yield raw

    def _dataset(self, i: int, source, entry: SourceEntry, limit: int | None, base: float, deal_base: float | None,
                 part: int, parts: int, counts: Counter) -> Iterator:
        """Dataset i's raw samples for this reader: `repeats` passes, or passes until `limit` (a pass that gives
        nothing ends it), each with its key made unique over the datasets (`<name>/<key>`, as the cache needs).
        Readers' parts of one pass are disjoint."""
        passes = range(entry.repeats) if limit is None else itertools.count()
        given = 0
        for j in passes:
            order = random.Random(f"{base}-{i}-{j}")
            deal = random.Random(f"{deal_base}-{i}") if deal_base is not None else None
            # Each pass deals anew; the reader takes another place at the table each pass, so the pass's leftover
            # units (when they do not divide evenly) do not always fall to the same readers. With the cache's fixed
            # deal the reader keeps its place (its share, and its cache, stay the same).
            place = part if deal is not None else (part + j) % parts
            before = given
            for raw in source.samples(order, place, parts, counts, deal):
                if limit is not None and given >= limit:
                    return
                given += 1
                raw.key, raw.dataset = f"{entry.name}/{raw.key}", i  # (each source makes a new RawSample a read)
                yield raw
            if given == before or (limit is not None and given >= limit):
                return
