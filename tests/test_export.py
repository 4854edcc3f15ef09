"""`python -m finetune.export`: a checkpoint exported as the trainer would have exported it at that step (full, with a
frozen text encoder, LoRA; EMA on), reused while fresh; sample and evaluate on a checkpoint; the errors, one line."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune import evaluate, export, lora, sample, visualize
from finetune.cli import UserError, run
from finetune.config import DataConfig, ModelConfig
from finetune.models import build_components

from .conftest import TINY_MODEL
from .test_train import _train

STEPS = ["train.max_train_steps=2", "train.checkpointing_steps=2", "train.use_ema=true"]
WEIGHTS = {"full": ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"],
           "frozen": ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"],
           "lora": [lora.WEIGHT_NAME]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs of 2 steps with a checkpoint at the last step, so checkpoint-2 is what the run exported: a full run
    from scratch; one whose from-scratch text encoder stays frozen (its seeded initial weights, in bf16); a LoRA on
    the first, with adapters on the text encoder too (alpha != rank)."""
    root = tmp_path_factory.mktemp("runs")
    _train(root, *STEPS, f"train.output_dir={root / 'full'}")
    _train(root, *STEPS, "model.train_text_encoder=false", "train.mixed_precision=bf16",
           f"train.output_dir={root / 'frozen'}")
    _train(root, *STEPS, f"model.pretrained_model_name_or_path={root / 'full'}", "model.train_text_encoder=false",
           "lora.enabled=true", "lora.rank=2", "lora.alpha=6", "lora.train_text_encoder=true",
           "train.learning_rate=1e-2", f"train.output_dir={root / 'lora'}")
    return root


def _copy(checkpoint, tmp_path):
    """A copy of a checkpoint (no export in it yet), as `<tmp_path>/run/checkpoint-2`."""
    return shutil.copytree(checkpoint, tmp_path / "run" / checkpoint.name, ignore=shutil.ignore_patterns("pipeline"))


@pytest.mark.parametrize("kind", list(WEIGHTS))
def test_a_checkpoint_exports_what_the_trainer_exported(runs, kind, tmp_path, capsys):
    run_dir = runs / kind
    checkpoint = _copy(run_dir / "checkpoint-2", tmp_path)
    out = export.main([str(checkpoint)])
    assert out == checkpoint / export.EXPORT_DIR
    assert capsys.readouterr().out.strip() == f"exported {checkpoint} (step 2) to {out}"
    for name in WEIGHTS[kind]:
        trained, exported = load_file(run_dir / name), load_file(out / name)
        assert trained.keys() == exported.keys(), name
        for key in trained:
            assert trained[key].dtype == exported[key].dtype and torch.equal(trained[key], exported[key]), (name, key)
    assert (out / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    # The EMA is what was exported: the checkpoint's training weights differ from it.
    training = load_file(checkpoint / "model.safetensors")
    exported = load_file(out / WEIGHTS[kind][0])
    if kind != "lora":
        assert any(not torch.equal(training[key], exported[key]) for key in training)
    else:
        assert (out / lora.WEIGHT_NAME).is_file() and not (out / "model_index.json").exists()


def test_sample_and_evaluate_take_a_checkpoint(runs, tmp_path, capsys):
    checkpoint = _copy(runs / "full" / "checkpoint-2", tmp_path)
    out = sample.main([str(checkpoint), "a red circle", "--num-inference-steps", "2", "--num-images-per-prompt", "2",
                       "--quiet"])
    printed = capsys.readouterr().out
    assert f"{checkpoint} is a training checkpoint (step 2): exported it" in printed
    assert out == checkpoint / export.EXPORT_DIR / "samples" / "sampled" and (out / "grid.png").is_file()
    assert json.loads((out / "settings.json").read_text())["folder"] == str(checkpoint)

    report = evaluate.main([str(checkpoint), "--metrics", "adherence", "--colors", "red", "--num-images-per-prompt",
                            "1", "--num-inference-steps", "2", "--quiet"])
    assert report["num_images"] == 3
    assert f"{checkpoint} is a training checkpoint (step 2): using its export in" in capsys.readouterr().out
    assert (checkpoint / export.EXPORT_DIR / evaluate.EVALUATION_FILE).is_file()

    lora_checkpoint = _copy(runs / "lora" / "checkpoint-2", tmp_path / "lora")
    out = sample.main([str(lora_checkpoint), "a red circle", "--num-inference-steps", "2", "--num-images-per-prompt",
                       "1", "--quiet"])
    assert json.loads((out / "settings.json").read_text())["adapters"]  # the base with the checkpoint's adapters


def test_an_export_is_reused_while_fresh_and_never_replaces_other_folders(runs, tmp_path):
    checkpoint = _copy(runs / "full" / "checkpoint-2", tmp_path)
    out, written = export.exported_checkpoint(checkpoint)
    assert written and export.exported_checkpoint(checkpoint) == (out, False)
    (out / "evaluation.json").write_text("{}")
    earlier = (checkpoint / "manifest.json").stat().st_mtime - 10
    os.utime(out / export.EXPORTED_FROM, (earlier, earlier))  # as if the checkpoint was written after the export
    assert export.exported_checkpoint(checkpoint) == (out, True) and not (out / "evaluation.json").exists()

    elsewhere = tmp_path / "elsewhere"
    assert export.exported_checkpoint(checkpoint, elsewhere) == (elsewhere, True)
    assert export.exported_checkpoint(checkpoint, elsewhere) == (elsewhere, False)
    other = _copy(runs / "frozen" / "checkpoint-2", tmp_path / "frozen")
    assert export.exported_checkpoint(other, elsewhere) == (elsewhere, True)  # an export of another checkpoint
    assert json.loads((elsewhere / export.EXPORTED_FROM).read_text())["checkpoint"] == str(other.resolve())
    with pytest.raises(UserError, match="exists and is not an export of a checkpoint"):
        export.exported_checkpoint(checkpoint, runs / "full")  # the run's own output folder stays as it is
    assert (runs / "full" / "checkpoint-2").is_dir()


def test_mistakes_are_one_line(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    damaged = _copy(runs / "full" / "checkpoint-2", tmp_path)
    (damaged / "ema_0.safetensors").unlink()
    cases = [
        (sample.main, [str(empty), "a red circle"], "neither a pipeline (no model_index.json), a LoRA output"),
        (evaluate.main, [str(empty)], "nor a training checkpoint (no manifest.json)"),
        (visualize.main, [str(empty)], "checkpoint-N folders"),
        (export.main, [str(empty)], "is not a training checkpoint (no manifest.json)"),
        (export.main, [str(damaged)], "is incomplete: missing ema_0.safetensors"),
        (evaluate.main, [str(damaged)], "is incomplete: missing ema_0.safetensors"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run(main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith("error: ")


def test_a_from_scratch_tokenizer_needs_the_training_data(tmp_path):
    missing = DataConfig(source="webdataset", path=str(tmp_path / "shards-{000..001}.tar"))
    with pytest.raises(UserError, match="tokenizer is rebuilt from its training captions.*could not be read"):
        export.training_captions(missing, 0)
    components = build_components(ModelConfig(**TINY_MODEL), 8, ["a red circle"])
    rows = {"embeddings.token_embedding.weight": torch.zeros(len(components.tokenizer) + 1, 4)}
    with pytest.raises(UserError, match=r"has \d+ tokens but the checkpoint's text encoder has \d+"):
        export.check_vocabulary(components, rows, missing)
