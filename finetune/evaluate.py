"""Does a trained pipeline draw what the prompt says? Colour and shape adherence on the shapes prompts.

Each image is judged without any learned model: the foreground is the saturated pixels (the built-in
backgrounds and watermark bars are near-grey); its colour is the nearest named hue to the foreground's
circular mean hue, and its shape follows from how much of its bounding box it fills (square 1,
circle pi/4, triangle 1/2).

    python -m finetune.evaluate outputs/shapes --num-images-per-prompt 8
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from pipelines import TextToImageDDPMPipeline

from .config import load_config
from .data.shapes import DEFAULT_COLORS, HUES, SHAPES
from .lora import WEIGHT_NAME as LORA_WEIGHTS

MIN_SATURATION = 0.35
MIN_FOREGROUND_SHARE = 0.01
SQUARE_FILL, CIRCLE_FILL = 0.89, 0.64  # fill >= 0.89: square; >= 0.64: circle; else triangle


def judge(image: np.ndarray, colors: tuple[str, ...] = tuple(HUES)) -> tuple[str | None, str | None]:
    """(colour, shape) of the one shape in an RGB uint8 image (H, W, 3); None where there is no foreground."""
    rgb = image.astype(np.float32) / 255
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0)
    mask = (saturation > MIN_SATURATION) & (high > 0.2)
    if mask.mean() < MIN_FOREGROUND_SHARE:
        return None, None

    r, g, b = (rgb[..., i][mask] for i in range(3))
    hue = np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b))  # the hexagonal hue angle
    mean_hue = math.degrees(math.atan2(np.sin(np.radians(hue)).mean(), np.cos(np.radians(hue)).mean())) % 360
    color = min(colors, key=lambda c: min(abs(mean_hue - HUES[c]), 360 - abs(mean_hue - HUES[c])))

    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box
    shape = "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"
    return color, shape


def evaluate_pipeline(pipeline: TextToImageDDPMPipeline, colors: tuple[str, ...] = DEFAULT_COLORS,
                      shapes: tuple[str, ...] = SHAPES, num_images_per_prompt: int = 8,
                      num_inference_steps: int = 50, guidance_scale: float = 1.0, seed: int = 0) -> dict:
    """Sample every "a <colour> <shape>" prompt and report colour and shape accuracy over all images,
    and the share of prompts whose images mostly match."""
    pipeline.set_progress_bar_config(disable=True)
    prompts = [(c, s) for c in colors for s in shapes]
    generator = torch.Generator().manual_seed(seed)
    images = pipeline(
        [f"a {c} {s}".replace("a orange", "an orange") for c, s in prompts],
        num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, generator=generator, output_type="np",
    ).images
    per_prompt = []
    for i, (color, shape) in enumerate(prompts):
        batch = images[i * num_images_per_prompt:(i + 1) * num_images_per_prompt]
        verdicts = [judge((im * 255).round().astype(np.uint8)) for im in batch]
        per_prompt.append({
            "prompt": f"{color} {shape}",
            "color_ok": sum(v[0] == color for v in verdicts) / len(verdicts),
            "shape_ok": sum(v[1] == shape for v in verdicts) / len(verdicts),
            "judged": [list(v) for v in verdicts],
        })
    return {
        "color_accuracy": float(np.mean([p["color_ok"] for p in per_prompt])),
        "color_accuracy_by_color": {c: float(np.mean([p["color_ok"] for p in per_prompt if p["prompt"].startswith(c)]))
                                    for c in colors},
        "shape_accuracy": float(np.mean([p["shape_ok"] for p in per_prompt])),
        "prompts_color_ok": float(np.mean([p["color_ok"] > 0.5 for p in per_prompt])),
        "prompts_shape_ok": float(np.mean([p["shape_ok"] > 0.5 for p in per_prompt])),
        "num_images": len(images),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "per_prompt": per_prompt,
    }


def run_guidance_scale(folder: str) -> float:
    """The guidance the run sampled its validation grids with (its saved config), or 1 without one."""
    path = Path(folder) / "config.yaml"
    return load_config(path).validation.guidance_scale if path.is_file() else 1.0


def load_result(folder: str) -> TextToImageDDPMPipeline:
    """The pipeline a run wrote to `folder`; for a LoRA run, its base (from the run's config.yaml) with the
    adapters loaded."""
    if not (Path(folder) / LORA_WEIGHTS).is_file():
        return TextToImageDDPMPipeline.from_pretrained(folder)
    model = load_config(Path(folder) / "config.yaml").model
    pipeline = TextToImageDDPMPipeline.from_pretrained(model.pretrained_model_name_or_path, revision=model.revision,
                                                       variant=model.variant)
    pipeline.load_lora_weights(folder)
    return pipeline


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="an output folder of finetune/train.py (a pipeline, or a LoRA on its base)")
    parser.add_argument("--num-images-per-prompt", type=int, default=8)
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance; default: the run's validation.guidance_scale (else 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colors", nargs="+", default=list(DEFAULT_COLORS), choices=list(HUES))
    parser.add_argument("--json", help="also write the full report to this file")
    args = parser.parse_args(argv)
    if args.guidance_scale is None:
        args.guidance_scale = run_guidance_scale(args.pipeline)
    pipeline = load_result(args.pipeline)
    report = evaluate_pipeline(pipeline, tuple(args.colors), SHAPES, args.num_images_per_prompt,
                               args.num_inference_steps, args.guidance_scale, args.seed)
    for p in report["per_prompt"]:
        print(f"  {p['prompt']:<18} colour {p['color_ok']:5.0%}  shape {p['shape_ok']:5.0%}")
    by_color = report["color_accuracy_by_color"]
    print("colour accuracy by colour: " + ", ".join(f"{c} {v:.1%}" for c, v in by_color.items()))
    print(f"colour accuracy {report['color_accuracy']:.1%} (prompts mostly right: {report['prompts_color_ok']:.0%}), "
          f"shape accuracy {report['shape_accuracy']:.1%} (prompts mostly right: {report['prompts_shape_ok']:.0%}) "
          f"over {report['num_images']} images, {args.num_inference_steps} steps, guidance {args.guidance_scale}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
