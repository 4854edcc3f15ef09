"""Several datasets in one run (data.sources): what each gives an epoch, exactly and over processes; per-dataset
captions and loss weights; the kohya dataset TOML importer; a mixed run trains, logs and resumes exactly."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.config import ConfigError, load_config
from finetune.data import ImageTextStream, build_source
from finetune.data.kohya_toml import read
from finetune.models import build_tokenizer
from finetune.objective import dataset_loss, diffusion_loss

from .test_train import _train


def _folder(path, count, captions=True, extension=".txt", shade=0):
    path.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((12, 12, 3), (shade + 9 * i) % 256, np.uint8)).save(path / f"{i}.png")
        if captions:
            (path / f"{i}{extension}").write_text(f"a photo, of, thing {i}")
    return str(path)


def _stream(config, rank=0, world_size=1, epoch=0):
    tokenizer = build_tokenizer(["sks a photo of thing dog 0 1 2 3 4 5 6 7 8 9"], 20)
    stream = ImageTextStream(build_source(config.data, 0), config.data, [tokenizer], seed=0, rank=rank,
                             world_size=world_size)
    stream.set_epoch(epoch)
    return stream, tokenizer


def _three(tmp_path, *extra):
    """Instance images 5 x 3 repeats, 4 more with samples_per_epoch 7 (cycled), 6 regularisation images weighing
    half: 15 + 7 + 6 = 28 samples an epoch."""
    a, b, c = (_folder(tmp_path / name, n, shade=s) for name, n, s in (("a", 5, 0), ("b", 4, 80), ("c", 6, 160)))
    sources = (f"[{{source: imagefolder, path: {a}, repeats: 3, caption_prefix: sks}}, "
               f"{{source: imagefolder, path: {b}, samples_per_epoch: 7, name: bee}}, "
               f"{{source: imagefolder, path: {c}, is_regularisation: true, loss_weight: 0.5}}]")
    return load_config(None, [f"data.sources={sources}", "data.resolution=8", "data.shuffle_buffer=4", *extra])


def test_each_dataset_gives_its_planned_samples_every_epoch_over_two_processes(tmp_path):
    """Over two readers (processes) and two epochs: each dataset gives exactly what the summary plans (expected ==
    seen), a repeated dataset every image exactly `repeats` times an epoch, the processes' parts of a pass
    disjoint; a new epoch is a new order, the same epoch the same stream (resume replays it)."""
    config = _three(tmp_path)
    source = build_source(config.data, 0)
    assert source.planned() == [15, 7, 6] and source.num_samples == 28
    assert "a: imagefolder" in source.describe() and "5 x 3 = 15 samples an epoch" in source.describe()
    orders = []
    for epoch in (0, 1):
        keys = []
        for rank in (0, 1):
            stream, _ = _stream(config, rank, 2, epoch)
            mine = [example["key"] for example in stream]
            keys += mine
            # 3 or 2 images of 5 in each pass, the odd one to another reader each pass: 8 and 7, not 9 and 6
            assert Counter(k.split("/")[0] for k in mine)["a"] in (7, 8)
        seen = Counter(k.split("/")[0] for k in keys)
        assert seen == {"a": 15, "bee": 7, "c": 6}
        assert set(Counter(k for k in keys if k.startswith("a/")).values()) == {3}
        orders.append(keys)
    assert orders[0] != orders[1]
    again = [example["key"] for example in _stream(config, 0, 2, 1)[0]]
    assert again == orders[1][:len(again)]


def test_the_mix_spreads_a_small_dataset_over_the_epoch(tmp_path):
    """The interleave weighs each dataset by what it has left: the regularisation images are not bunched at
    the end (without a shuffle buffer, in the order the mix draws)."""
    config = _three(tmp_path, "data.shuffle_buffer=0")
    keys = [example["key"] for example in _stream(config)[0]]
    places = [i for i, k in enumerate(keys) if k.startswith("c/")]
    assert len(places) == 6 and places[0] < len(keys) / 2 and places[-1] > len(keys) / 2


def test_each_sample_carries_its_datasets_captions_and_weight(tmp_path):
    """The prefix, the default caption for an image without one, shuffled tags after keep_tokens, the caption
    extension; the loss weight and regularisation flag; the epoch counts per dataset."""
    a = _folder(tmp_path / "a", 3, extension=".caption")
    b = _folder(tmp_path / "b", 2, captions=False)
    sources = (f"[{{source: imagefolder, path: {a}, caption_extension: .caption, caption_prefix: sks, "
               f"shuffle_caption: true, keep_tokens: 1, caption_dropout: 0}}, "
               f"{{source: imagefolder, path: {b}, default_caption: a dog, is_regularisation: true, "
               f"loss_weight: 0.25, caption_dropout: 0}}]")
    config = load_config(None, [f"data.sources={sources}", "data.resolution=8"])
    stream, tokenizer = _stream(config)
    examples = list(stream)
    captions = {e["key"]: tokenizer.decode(e["input_ids"], skip_special_tokens=True) for e in examples}
    for key, caption in captions.items():
        if key.startswith("a/"):
            words = caption.split()
            assert words[:3] == ["sks", "a", "photo"] and sorted(words[3:]) == sorted(["of", "thing", key[2]])
        else:
            assert caption == "a dog"
    weights = {e["key"][0]: (float(e["loss_weight"]), bool(e["regularisation"])) for e in examples}
    assert weights == {"a": (1.0, False), "b": (0.25, True)}
    assert stream.counts["dataset a"] == 3 and stream.counts["dataset b"] == 2


def test_dataset_loss_weighs_samples_and_reports_the_two_groups():
    """All weights 1: the plain loss; a regularisation weight 0: no gradient from those samples, and the loss is
    the instance samples' loss share; the logged sums and counts are per group, unweighted."""
    torch.manual_seed(0)
    pred, target = torch.randn(4, 3, 4, 4, requires_grad=True), torch.randn(4, 3, 4, 4)
    reg = torch.tensor([False, True, False, True])
    loss, groups = dataset_loss(pred, target, None, None, torch.ones(4), reg)
    torch.testing.assert_close(loss, diffusion_loss(pred, target))
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3)).detach()
    torch.testing.assert_close(groups, torch.stack([per_sample[[0, 2]].sum(), torch.tensor(2.0),
                                                    per_sample[[1, 3]].sum(), torch.tensor(2.0)]))
    loss, _ = dataset_loss(pred, target, None, None, torch.tensor([1.0, 0.0, 1.0, 0.0]), reg)
    loss.backward()
    assert pred.grad[[1, 3]].abs().max() == 0 and pred.grad[[0, 2]].abs().min() > 0
    torch.testing.assert_close(loss, per_sample[[0, 2]].sum() / 4)


@pytest.mark.parametrize("entry, message", [
    ("{source: imagefolder, path: x, colour: red}", "data.sources[0].colour: unknown key"),
    ("{source: imagefolder, path: x, resolution: 64}", "resolution cannot differ between datasets"),
    ("{path: x}", "data.sources[0].source: required"),
    ("{source: imagefolder, path: x, repeats: 2, samples_per_epoch: 5}", "repeats or samples_per_epoch"),
    ("{source: imagefolder, path: x, caption_dropout: 2}", "data.sources[0].caption_dropout: got 2"),
    ("{source: imagefolder, path: x, is_regularisation: true}", "at least one must be the data to learn"),
    ("{source: imagefolder, path: x, repeats: 0}", "data.sources[0].repeats: got 0"),
])
def test_a_bad_entry_is_named(entry, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [f"data.sources=[{entry}]"])


KOHYA_TOML = """
# as in kohya sd-scripts' docs/config_README-en.md (DreamBooth method, with regularisation images)
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 16
batch_size = 2
enable_bucket = false

  [[datasets.subsets]]
  image_dir = '{instance}'
  class_tokens = 'hoge girl'
  num_repeats = 10

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'girl'
  keep_tokens = 0
"""


def test_a_kohya_dataset_toml_becomes_data_sources(tmp_path):
    """Each subset an imagefolder entry with kohya's settings ([general] < dataset < subset), the dataset's
    resolution and batch size run-wide, and kohya's regularisation balance: as many regularisation samples an
    epoch as training samples with repeats (3 images x 10 = 30). YAML keys win over the TOML's."""
    instance, reg = _folder(tmp_path / "img", 3), _folder(tmp_path / "reg", 8, captions=False)
    toml = tmp_path / "dataset.toml"
    toml.write_text(KOHYA_TOML.format(instance=instance, reg=reg))
    config = load_config(None, [f"data.kohya_toml={toml}", "data.resolution=8"])
    assert config.data.kohya_toml is None and config.data.resolution == 8 and config.train.train_batch_size == 2
    first, second = config.data.sources
    assert first == {"source": "imagefolder", "name": "0-0-img", "caption_extension": ".txt", "caption_dropout": 0.0,
                     "shuffle_caption": True, "keep_tokens": 1, "path": instance, "default_caption": "hoge girl",
                     "repeats": 10}
    assert second["is_regularisation"] and second["samples_per_epoch"] == 30 and second["keep_tokens"] == 0
    assert build_source(config.data, 0).planned() == [30, 30]
    # A per-dataset key of the YAML applies to every dataset; kohya's prior_loss_weight to the regularisation ones.
    toml.write_text(KOHYA_TOML.format(instance=instance, reg=reg).replace("batch_size = 2",
                                                                          "batch_size = 2\nprior_loss_weight = 0.3"))
    first, second = load_config(None, [f"data.kohya_toml={toml}", "data.caption_dropout=0.2"]).data.sources
    assert first["caption_dropout"] == second["caption_dropout"] == 0.2
    assert "loss_weight" not in first and second["loss_weight"] == 0.3


def test_the_kohya_regularisation_balance_is_kohyas(tmp_path):
    """kohya registers regularisation images folder by folder, each with its folder's repeats, until they reach
    the training images x repeats (then +1 per image and round): 10 images x 5 repeats fill the 20 training samples
    after 4 images, so the second folder gets none and is left out; with 200 training samples the first round gives
    50 + 10 and seven more rounds of +1 per image bring 120 + 80."""
    folders = {name: _folder(tmp_path / name, n, captions=False) for name, n in (("img", 2), ("r1", 10),
                                                                                 ("r2", 10))}
    for repeats, expected in ((10, [20]), (100, [120, 80])):
        toml = tmp_path / f"d{repeats}.toml"
        toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folders['img']}'\nnum_repeats = {repeats}\n"
                        f"[[datasets.subsets]]\nimage_dir = '{folders['r1']}'\nis_reg = true\nnum_repeats = 5\n"
                        f"[[datasets.subsets]]\nimage_dir = '{folders['r2']}'\nis_reg = true\n")
        sources = load_config(None, [f"data.kohya_toml={toml}"]).data.sources
        assert [s["samples_per_epoch"] for s in sources if s.get("is_regularisation")] == expected


@pytest.mark.parametrize("change, message", [
    (("  num_repeats = 10", "  num_repeats = 10\n  color_aug = true"), "subsets[0].color_aug: this importer"),
    (("  num_repeats = 10", "  num_repeats = 10\n  metadata_file = 'm.json'"), "write a metadata.jsonl"),
    (("resolution = 16", "resolution = [16, 24]"), "only a square resolution"),
    (("[general]", "[general]\nfoo = 1\n[other]"), "top-level"),
    (("  num_repeats = 10", "  num_repeats = 0"), "num_repeats an integer >= 1"),
    (("  num_repeats = 10", "  is_reg = true"), "regularisation subsets only"),
    (("[[datasets]]", "[datasets]"), "needs [[datasets]] tables"),
])
def test_a_kohya_key_that_does_not_carry_over_is_refused_by_name(tmp_path, change, message):
    instance, reg = _folder(tmp_path / "img", 3), _folder(tmp_path / "reg", 2, captions=False)
    toml = tmp_path / "dataset.toml"
    toml.write_text(KOHYA_TOML.format(instance=instance, reg=reg).replace(*change))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [f"data.kohya_toml={toml}"])


@pytest.mark.parametrize("second, message", [("batch_size = 4", r"datasets\[1\].batch_size = 4 but datasets\[0\]"),
                                             ("", r"datasets\[1\].batch_size = None but datasets\[0\]")])
def test_datasets_with_other_batch_sizes_are_refused(tmp_path, second, message):
    """Here every batch draws from all datasets: one batch size (given by all of them, or by none)."""
    instance, reg = _folder(tmp_path / "img", 3), _folder(tmp_path / "reg", 2, captions=False)
    other = f"\n[[datasets]]\n{second}\n  [[datasets.subsets]]\n  image_dir = '{{instance}}'\n"
    (tmp_path / "d.toml").write_text((KOHYA_TOML + other).format(instance=instance, reg=reg))
    with pytest.raises(ConfigError, match=message):
        read(str(tmp_path / "d.toml"))


def test_a_mix_names_what_the_data_section_cannot_hold(tmp_path):
    """With data.sources the data section names no source or path of its own, held-out data names its source,
    and the trackers see each dataset's path as they see data.path (no credentials, local paths by name)."""
    entry = "data.sources=[{source: webdataset, path: 'a.tar::https://user:pw@host/b.tar?X-Amz-Signature=s'}]"
    with pytest.raises(ConfigError, match=r"data.source, data.path: with data.sources each dataset names its own"):
        load_config(None, [entry, "data.source=webdataset", "data.path=x.tar"])
    with pytest.raises(ConfigError, match="validation.loss_data.source: with data.sources"):
        load_config(None, [entry, "validation.loss_samples=4", "validation.loss_data={path: val.tar}"])
    from finetune.progress import tracker_settings

    settings = tracker_settings(load_config(None, [entry]))
    assert settings["data.sources.0.path"] == "a.tar::https://host/b.tar?X-Amz-Signature=REDACTED"


def test_a_mixed_run_trains_logs_each_group_and_resumes_exactly(tmp_path):
    """Three built-in sets of other colours (24 x 2 repeats, 16 with a prefix, 8 regularisation images cycled to
    12 at half weight): 76 samples, 19 steps an epoch. The summary gives the plan, the epoch log what each gave,
    metrics.jsonl the instance and regularisation losses; a run resumed at step 10 ends bitwise equal to the
    uninterrupted one at step 24 (across the epoch's end)."""
    sources = ("[{source: builtin, name: red, colors: [red], num_samples: 24, repeats: 2, path: red}, "
               "{source: builtin, name: blue, colors: [blue], num_samples: 16, path: blue, caption_prefix: sks}, "
               "{source: builtin, name: reg, colors: [green], num_samples: 8, samples_per_epoch: 12, path: reg, "
               "is_regularisation: true, loss_weight: 0.5}]")
    common = [f"data.sources={sources}", "train.max_train_steps=24", "train.checkpointing_steps=10",
              "data.num_samples=null", "data.filters.max_pwatermark=null"]  # (no sample dropped: counts as planned)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = _train(tmp_path, *common, f"train.output_dir={full}")
    assert "3 datasets, 76 samples an epoch" in result.stdout and "red: builtin red - 24 x 2 = 48" in result.stdout
    lines = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [line["data"] for line in lines if "data" in line] == [
        {"used": 76, "dataset red": 48, "dataset blue": 16, "dataset reg": 12}]  # the first epoch's, as planned
    logged = [line for line in lines if "loss_instance" in line]
    assert len(logged) == 24 and sum("loss_regularisation" in line for line in logged) >= 6
    resumed.mkdir()
    os.symlink(full / "checkpoint-10", resumed / "checkpoint-10")
    _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    a, b = load_file(full / "checkpoint-20" / "model.safetensors"), load_file(resumed / "checkpoint-20" /
                                                                               "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    exported = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    again = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    for key in exported:
        torch.testing.assert_close(exported[key], again[key], rtol=0, atol=0, msg=key)


def test_evaluate_takes_held_out_data_beside_a_mix(tmp_path):
    """`finetune.evaluate --data` on a mixed run: the overrides name held-out data of their own; a mixed run
    without them, or with one of its own datasets, has no held-out data."""
    from finetune.config import config_yaml
    from finetune.heldout import held_out_data, is_training_data

    a, val = _folder(tmp_path / "a", 2), _folder(tmp_path / "val", 2)
    (tmp_path / "config.yaml").write_text(config_yaml(load_config(None, [
        f"data.sources=[{{source: imagefolder, path: {a}}}]", "data.resolution=8"])))
    run, held_out = held_out_data(str(tmp_path), ["data.source=imagefolder", f"data.path={val}"], 8)
    assert held_out.path == val and not held_out.sources and not is_training_data(run, held_out)
    assert is_training_data(*held_out_data(str(tmp_path), [], 8))
    assert is_training_data(*held_out_data(str(tmp_path), ["data.source=imagefolder", f"data.path={a}"], 8))


def test_the_model_card_names_each_hub_dataset_of_a_mix(tmp_path):
    from finetune.model_card import card_metadata

    config = load_config(None, ["data.sources=[{source: hf, path: someone/dogs}, {source: imagefolder, path: "
                                f"{tmp_path}}}]"])
    metadata = card_metadata(config.model, config.data, config.lora, None)
    assert metadata.datasets == ["someone/dogs"]
