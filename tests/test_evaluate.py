"""The adherence metric: the judge on known drawings, the report on a (random) pipeline."""

import json

import numpy as np
from PIL import Image, ImageDraw

from finetune import evaluate


def _draw(shape, rgb, size=32, box=(6, 8, 24, 26)):
    image = Image.new("RGB", (size * 4, size * 4), (245, 243, 240))
    draw, big = ImageDraw.Draw(image), [4 * v for v in box]
    if shape == "circle":
        draw.ellipse(big, fill=rgb)
    elif shape == "square":
        draw.rectangle(big, fill=rgb)
    else:
        draw.polygon([((big[0] + big[2]) / 2, big[1]), (big[2], big[3]), (big[0], big[3])], fill=rgb)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def test_judge_known_drawings():
    colors = {"red": (220, 30, 30), "orange": (240, 130, 20), "yellow": (235, 225, 30), "green": (30, 180, 40),
              "blue": (30, 60, 220), "purple": (150, 40, 220)}
    for name, rgb in colors.items():
        for shape in ("circle", "square", "triangle"):
            assert evaluate.judge(_draw(shape, rgb)) == (name, shape)


def test_grey_watermark_is_not_foreground():
    image = _draw("circle", (30, 60, 220)).copy()
    image[1:4, 2:30] = 128
    assert evaluate.judge(image) == ("blue", "circle")


def test_report_on_a_pipeline(tiny_pipeline, tmp_path):
    report = evaluate.evaluate_pipeline(tiny_pipeline, colors=("red", "blue"), num_images_per_prompt=2,
                                        num_inference_steps=2)
    assert report["num_images"] == 12 and len(report["per_prompt"]) == 6
    assert 0 <= report["color_accuracy"] <= 1 and 0 <= report["shape_accuracy"] <= 1
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    out = evaluate.main([str(tmp_path / "pipe"), "--num-images-per-prompt", "1", "--num-inference-steps", "2",
                         "--colors", "red", "--json", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text())["num_images"] == out["num_images"] == 3


def test_guidance_defaults_to_the_runs(tiny_pipeline, tmp_path):
    from finetune.config import load_config, save_config

    tiny_pipeline.save_pretrained(tmp_path)
    assert evaluate.run_guidance_scale(str(tmp_path)) == 1.0
    save_config(load_config(None, ["validation.guidance_scale=2.5"]), tmp_path / "config.yaml")
    report = evaluate.main([str(tmp_path), "--num-images-per-prompt", "1", "--num-inference-steps", "1",
                            "--colors", "red"])
    assert report["guidance_scale"] == 2.5
