"""Prompt adherence on any class-captioned data, judged by a classifier fitted on the run's training images."""

import io
import json
from argparse import Namespace
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from finetune import class_adherence, evaluate
from finetune.cli import UserError
from finetune.config import DataConfig
from finetune.data.shapes import render_sample

COLORS = {"red": ["red"], "green": ["green"], "blue": ["blue"]}


def test_classes_and_their_words():
    classes = class_adherence.parse_classes(["seven:7", "one:1,i"])
    assert classes == {"seven": ["seven", "7"], "one": ["one", "1", "i"]}
    assert class_adherence.caption_class("the number 7 written by hand", classes) == "seven"
    assert class_adherence.caption_class("a handwritten digit One", classes) == "one"
    assert class_adherence.caption_class("seventeen", classes) is None  # words, not substrings
    assert class_adherence.caption_class("a 7 and a 1", classes) is None  # two classes: left out
    with pytest.raises(UserError, match="at least two classes"):
        class_adherence.parse_classes(["seven"])


class FakePipeline:
    """Draws a built-in-set image of the colour its prompt names (`faithful`), or always a red one."""

    def __init__(self, faithful: bool):
        self.faithful = faithful

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompts, generator=None, output_type="np", **kwargs):
        colors = [next(c for c in COLORS if c in p) if self.faithful else "red" for p in prompts]
        images = [Image.open(io.BytesIO(render_sample(i, seed=7, colors=(color,))[0])).convert("RGB").resize((16, 16))
                  for i, color in enumerate(colors)]
        return SimpleNamespace(images=np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images]))


def _args(**kwargs):
    return Namespace(**{"classifier": None, "fit_samples": 120, "num_images_per_prompt": 4,
                        "class_prompt": "a {} circle", "class_guidance": [1.0, 3.0], "guidance_scale": 2.0,
                        "num_inference_steps": 2, "seed": 0, "batch_size": 8, "quiet": True, "device": "cpu",
                        **kwargs})


@pytest.mark.parametrize(("faithful", "expected"), [(True, 1.0), (False, 1 / 3)])
def test_the_judge_fitted_on_the_training_images_scores_the_prompted_class(faithful, expected):
    """The built-in set's images, labelled by the colour word of their captions, fit a judge that tells red, green
    and blue apart; images of the prompted colour score 1, always-red images 1/3 (the red third)."""
    data = DataConfig(colors=["red", "green", "blue"], resolution=16)
    report, values, settings = evaluate.report_classes(FakePipeline(faithful), COLORS, _args(), data)
    assert report["judge_accuracy"] >= 0.95, report["judge"]
    assert values["class_adherence_guidance_1"] == values["class_adherence_guidance_3"] == pytest.approx(expected)
    assert values["class_adherence"] == values["class_adherence_guidance_1"]
    assert settings["classes_guidance"] == [1.0, 3.0] and json.dumps(report)  # (the report is JSON)


def test_the_classes_metric_through_the_command(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "run")
    report = evaluate.main([str(tmp_path / "run"), "--metrics", "classes", "--classes", "red", "green", "blue",
                            "--class-prompt", "a {} square", "--num-images-per-prompt", "2", "--num-inference-steps",
                            "2", "--fit-samples", "300", "--quiet"])
    saved = json.loads((tmp_path / "run" / "evaluation.json").read_text())["metrics"]
    assert 0 <= saved["class_adherence"] <= 1 and saved["class_judge_accuracy"] >= 0.9, saved
    assert report["classes"]["by_guidance"]["1.0"]["adherence"] == saved["class_adherence"]


def test_a_template_without_a_place_for_the_class_is_refused(tiny_pipeline, tmp_path, capsys):
    tiny_pipeline.save_pretrained(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([str(tmp_path / "run"), "--metrics", "classes", "--classes", "red", "blue", "--class-prompt",
                       "a circle"])
    assert exit_.value.code == 2 and "--class-prompt 'a circle': put {} where the class name goes" in \
        capsys.readouterr().err
