"""What validation shows during a run: prompts with settings of their own (`validation.prompts` entries with a seed,
guidance or negative prompt: each such row drawn by its own call, plain prompts still in one; the model card's
snippet draws the same images), the base's own grid beside each grid, and the validation loss on held-out pairs."""

import numpy as np
import pytest
import torch

from finetune.config import ConfigError, ValidationConfig, ValidationPrompt, load_config
from finetune.model_card import sampling_code
from finetune.validation import log_validation, sample_grid

ROWS = ['validation.prompts=[{prompt: "a red circle", seed: 5, guidance_scale: 2.0, '
        'negative_prompt: "a blue triangle"}, "a green square"]',
        "validation.num_images_per_prompt=2", "validation.num_inference_steps=3", "validation.seed=7",
        "validation.guidance_scale=1.5"]
PLAIN = ["validation.num_images_per_prompt=2", "validation.num_inference_steps=3"]


def _tiles(grid, count: int, size: int, pad: int = 2) -> list[np.ndarray]:
    """The images of a `make_grid` grid of `count` columns."""
    array = np.asarray(grid)
    rows = (array.shape[0] - pad) // (size + pad)
    return [array[pad + r * (size + pad): pad + r * (size + pad) + size, pad + c * (size + pad): pad + c * (size + pad)
                  + size] for r in range(rows) for c in range(count)]


def test_a_prompt_with_settings_of_its_own_is_read_and_resolved(tmp_path):
    from finetune.config import config_yaml

    config = load_config(None, ROWS).validation
    assert config.prompts == [ValidationPrompt("a red circle", "a blue triangle", 5, 2.0), "a green square"]
    assert config.per_prompt and config.texts == ["a red circle", "a green square"]
    assert config.rows() == [ValidationPrompt("a red circle", "a blue triangle", 5, 2.0),
                             ValidationPrompt("a green square", None, 7, 1.5)]  # the section's seed and guidance
    saved = tmp_path / "config.yaml"
    saved.write_text(config_yaml(load_config(None, ROWS)))
    assert load_config(saved).validation == config
    assert not ValidationConfig().per_prompt


@pytest.mark.parametrize(("prompts", "message"), [
    ('[{prompt: "a", sed: 3}]', "validation.prompts\\[0\\].sed: unknown key; did you mean "
                                "validation.prompts\\[0\\].seed"),
    ("[{seed: 3}]", "validation.prompts: got \\[''\\]; give at least one non-empty prompt \\(a row with settings"),
    ("[{prompt: a, guidance_scale: -1}]", "validation.prompts: 'a' has guidance_scale -1.0; must be >= 0"),
    ("[3]", "validation.prompts\\[0\\]: got 3 \\(int\\); expected str"),
])
def test_bad_prompt_entries_are_named(prompts, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"validation.prompts={prompts}"])


def test_each_row_is_drawn_with_its_own_settings(tiny_pipeline):
    """The first row: its own seed, guidance and negative prompt; the second: the section's seed and guidance; both
    as a call for that prompt alone draws them. The prompts' conditioning gaps are still measured."""
    config = load_config(None, ROWS).validation
    gaps = {}
    tiles = _tiles(sample_grid(tiny_pipeline, config, gaps), 2, 8)

    def alone(prompt, seed, guidance, **kwargs):
        return [np.asarray(image) for image in tiny_pipeline(
            prompt, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed), output_type="pil", **kwargs).images]

    expected = alone("a red circle", 5, 2.0, negative_prompt="a blue triangle") + alone("a green square", 7, 1.5)
    assert len(tiles) == 4 and all(np.array_equal(a, b) for a, b in zip(tiles, expected))
    assert not np.array_equal(tiles[:2], alone("a red circle", 5, 2.0))  # the negative prompt was used
    assert {"conditioning/prompt_vs_empty_start", "conditioning/between_prompts_start"} <= gaps.keys()


def test_plain_prompts_are_still_one_call(tiny_pipeline):
    config = load_config(None, PLAIN).validation
    images = tiny_pipeline(config.texts, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(0), output_type="pil").images
    tiles = _tiles(sample_grid(tiny_pipeline, config), 2, 8)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(tiles, images, strict=True))


@pytest.mark.parametrize("overrides", [ROWS, PLAIN])
def test_the_model_cards_code_draws_the_grid(tiny_pipeline, overrides):
    """`model_card.sampling_code`, the model card's sampling lines, run as written: the grid's images, row by row."""
    config = load_config(None, overrides).validation
    scope = {"torch": torch, "pipe": tiny_pipeline}
    exec(sampling_code(config), scope)
    tiles = _tiles(sample_grid(tiny_pipeline, config), 2, 8)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(tiles, scope["images"], strict=True))


def test_validation_with_rows_of_their_own_writes_its_pictures(tiny_pipeline, tmp_path):
    """A validation of a run: the grid and the reverse-process strip (of the first row, with its settings)."""
    config = load_config(None, ROWS).validation
    path = log_validation(tiny_pipeline, config, 3, str(tmp_path), [])
    assert path == tmp_path / "samples" / "step-3.png" and path.is_file()
    assert (tmp_path / "samples" / "process" / "reverse-step-3.png").is_file()


def test_the_readmes_example_loads(tmp_path):
    """README, "Validation prompts, the base beside, the held-out loss": its YAML is a valid config whose second row
    has its own settings."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Validation prompts, the base beside"):]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (tmp_path / "run.yaml").write_text(example)
    rows = load_config(tmp_path / "run.yaml").validation.rows()
    assert rows == [ValidationPrompt("a red circle", None, 0, 3.0),
                    ValidationPrompt("a sks dog on a beach", "blurry, low quality", 42, 7.5)]


@pytest.mark.slow
def test_a_fine_tune_draws_its_bases_grid_once_and_logs_each_grid_beside_it(tiny_pipeline, tmp_path):
    """A LoRA run on a base: before the first step it draws the base's own grid (samples/base.png), the very images
    the stock base pipeline draws with the validation settings; each later grid is logged beside it
    (validation/vs_base). Resumed, it draws none again."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipelines import TextToImageDDPMPipeline

    from .test_finetune import _regrid
    from .test_train import _train

    base = tmp_path / "base"
    tiny_pipeline.save_pretrained(base)
    out = tmp_path / "run"
    common = [f"model.pretrained_model_name_or_path={base}", "model.train_text_encoder=false", "lora.enabled=true",
              "train.checkpointing_steps=2", "validation.validation_steps=2", f"train.output_dir={out}"]
    result = _train(tmp_path, *common, "train.max_train_steps=2")
    assert "the base's own grid, to compare with" in result.stderr
    drawn = np.asarray(Image.open(out / "samples" / "base.png"))
    assert np.array_equal(drawn, _regrid(TextToImageDDPMPipeline.from_pretrained(base), out))
    assert not np.array_equal(drawn, np.asarray(Image.open(out / "samples" / "step-2.png")))
    tags = set()
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["images"])
    assert "validation/vs_base" in tags

    written = (out / "samples" / "base.png").stat().st_mtime_ns
    result = _train(tmp_path, *common, "train.max_train_steps=4", "train.resume_from_checkpoint=latest")
    assert "the base's own grid" not in result.stderr
    assert (out / "samples" / "base.png").stat().st_mtime_ns == written


@pytest.mark.parametrize(("overrides", "message"), [
    (["validation.loss_data={pth: val.tar}"], "validation.loss_data.pth: unknown key; did you mean "
                                              "validation.loss_data.path"),
    (["data.source=webdataset", "data.path=x.tar", "validation.loss_samples=8"],
     "validation.loss_samples: with your own data, name the held-out pairs in validation.loss_data"),
    (["validation.loss_samples=-1"], "validation.loss_samples: got -1; must be >= 0"),
    (["validation.loss_data={resolution: '64'}"], "validation.loss_data.resolution: got '64' \\(str\\); expected int"),
    (["data.source=webdataset", "data.path=x.tar", "validation.loss_data={caption_column: text}"],
     "validation.loss_data: it names the training data itself"),
])
def test_bad_held_out_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_held_out_data_of_another_kind_than_the_runs_is_read_once_over():
    """Resampled training shards, held-out pairs in an image folder: accepted, read in order, never resampled."""
    from finetune.config import held_out_section

    config = load_config(None, ["data.source=webdataset", "data.path=x.tar", "data.resampled=true",
                                "data.num_samples=100", "validation.loss_data={source: imagefolder, path: val}"])
    held_out = held_out_section(config.data, config.validation.loss_data)
    assert (held_out.source, held_out.path, held_out.resampled, held_out.num_samples) == ("imagefolder", "val",
                                                                                       False, None)


def test_a_credential_in_the_held_out_path_stays_off_the_trackers():
    from finetune.progress import tracker_settings

    config = load_config(None, ["validation.loss_data={source: webdataset, path: 'https://u:tok@host/val.tar'}"])
    assert tracker_settings(config)["validation.loss_data.path"] == "https://host/val.tar"


@pytest.mark.slow
def test_the_validation_loss_is_logged_over_the_run_as_the_evaluator_measures_it(tmp_path):
    """validation.loss_samples: at each validation and at the end, the loss on the built-in set's held-out
    renderings, logged to the trackers; the last value is what the evaluator's own function gives for the exported
    pipeline on the same pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune import heldout, metrics
    from pipelines import TextToImageDDPMPipeline

    from .test_train import _train

    out = tmp_path / "run"
    result = _train(tmp_path, "validation.loss_samples=8", "validation.validation_steps=2", "train.max_train_steps=4",
                    f"train.output_dir={out}")
    assert "step 2: validation loss " in result.stderr and "over 8 held-out pairs" in result.stderr
    logged = {}
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events)).Reload()
        if "validation_loss" in accumulator.Tags()["scalars"]:
            logged.update({e.step: e.value for e in accumulator.Scalars("validation_loss")})
            assert "validation_loss_t50" in accumulator.Tags()["scalars"]
    assert set(logged) == {2, 4}

    config = load_config(out / "config.yaml")
    held_out = heldout.read_in_order(config.data)
    pairs = heldout.held_out_pairs(heldout.held_out_source(held_out, 8), held_out, 8)[0]
    pipe = TextToImageDDPMPipeline.from_pretrained(out)
    report = heldout.validation_loss(pipe, pairs, metrics.loss_timesteps(pipe.scheduler.config.num_train_timesteps))
    assert logged[4] == pytest.approx(report["mean"], rel=1e-5)
