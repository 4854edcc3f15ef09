"""Evaluate a trained model: prompt adherence on the shapes prompts, validation loss on held-out image-text pairs,
and, with a feature model on disk, CLIP score and FID. The headline numbers go to `<folder>/evaluation.json`,
merged with what an earlier evaluation of other metrics wrote there.

    python -m finetune.evaluate outputs/shapes                      # adherence (built-in runs) and validation loss
    python -m finetune.evaluate outputs/shapes --metrics loss --num-loss-timesteps 20
    python -m finetune.evaluate outputs/sd-lora --data data.source=webdataset "data.path=val/{000..001}.tar" \
        --max-samples 1000 --metrics loss clip fid --clip-model models/clip-vit-large-patch14
    python -m finetune.evaluate outputs/shapes/checkpoint-1000      # a checkpoint: exported first (finetune.export)

The folder is a run's output (a pipeline, or a LoRA output), or one of its checkpoint-N folders, which is exported
first as the trainer would have exported it at that step (into checkpoint-N/pipeline, where evaluation.json then
goes; reused after). Progress bars count the work of each metric unless --quiet.

Metrics:
  adherence  colour and shape accuracy of "a <colour> <shape>" samples, judged without a learned model: the
             foreground is the saturated pixels (the built-in backgrounds and watermark bars are near-grey); its
             colour is the nearest named hue to its circular mean hue, its shape follows from how much of its
             bounding box it fills (square 1, circle pi/4, triangle 1/2).
  loss       the training objective (the model's prediction type, no min-SNR weights, no noise offset) on held-out
             pairs at fixed timesteps with fixed noise: the same model and data give the same number, so
             checkpoints compare. For the built-in set the held-out pairs are new renderings (seed 1; training
             renders seed 0) of the same colours, shapes and caption templates: new images, not new concepts.
             Other runs name held-out data with --data overrides of the run's data section. An SDXL model is
             conditioned as it trains: both encoders, the pooled embedding, each pair's size and crop.
  clip       CLIP score: 100 * max(cos(image, caption), 0) averaged over images generated from held-out captions.
  fid        Frechet distance between features of those generated images and of the held-out real images, with
             the feature model you supply (--fid-model, default --clip-model): "CLIP-feature FID", not comparable
             with Inception-feature FID from papers; it depends on the sample count (compare equal counts only).
"""

import argparse
import functools
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from . import class_adherence, cli, metrics
from .cli import ToolParser, UserError
from .config import DataConfig
from .data.shapes import DEFAULT_COLORS, HUES, SHAPES
from .heldout import describe_data, held_out_data, held_out_pairs, held_out_source, is_training_data, validation_loss
from .results import hide_library_progress, load_result, result_folder, run_guidance_scale

EVALUATION_FILE = "evaluation.json"
METRICS = ("adherence", "loss", "clip", "fid", "classes")
# The metric names each group writes (a detail is named `<name>_<detail>`), replaced when the group runs again.
METRIC_NAMES = {"adherence": ("color_accuracy", "shape_accuracy"), "loss": ("validation_loss",),
                "clip": ("clip_score",), "fid": ("fid",), "classes": ("class_adherence", "class_judge_accuracy")}

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


def evaluate_pipeline(pipeline: DiffusionPipeline, colors: tuple[str, ...] = DEFAULT_COLORS,
                      shapes: tuple[str, ...] = SHAPES, num_images_per_prompt: int = 8,
                      num_inference_steps: int = 50, guidance_scale: float = 1.0, seed: int = 0,
                      progress: bool = False) -> dict:
    """Sample every "a <colour> <shape>" prompt and report colour and shape accuracy over all images,
    and the share of prompts whose images mostly match. The images are one batch drawn from one generator (the
    reported numbers depend on it), so `progress` shows a bar over that batch's denoising steps."""
    pipeline.set_progress_bar_config(disable=True)
    prompts = [(c, s) for c in colors for s in shapes]
    generator = torch.Generator().manual_seed(seed)
    with tqdm(total=num_inference_steps, desc=f"adherence: {len(prompts) * num_images_per_prompt} images",
              unit="step", disable=not progress) as bar:
        images = pipeline(
            [f"a {c} {s}".replace("a orange", "an orange") for c, s in prompts],
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=generator, output_type="np",
            callback_on_step_end=functools.partial(_advance, bar),
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


def _advance(bar: tqdm, pipeline, step: int, timestep, tensors: dict) -> dict:
    """A pipeline's `callback_on_step_end` that advances `bar` by one step and changes nothing."""
    bar.update(1)
    return {}


# ---- CLIP score and FID ------------------------------------------------------------------------


def generate_images(pipeline: DiffusionPipeline, prompts: list[str], num_inference_steps: int,
                    guidance_scale: float, seed: int = 0, batch_size: int = 32,
                    progress: bool = False) -> list[np.ndarray]:
    """One image (RGB uint8) per prompt; image i is drawn with its own generator seeded `seed + i`, so it does not
    depend on the batch size. `progress`: a bar counts the images."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    with tqdm(total=len(prompts), desc="generating", unit="image", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            out = pipeline(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           generator=generators, output_type="np").images
            images.extend((out * 255).round().clip(0, 255).astype(np.uint8))
            bar.update(len(chunk))
    return images


def to_rgb_array(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [-1, 1] to an RGB uint8 array (H, W, 3); refuses uint8 pixels, which are that already."""
    if pixels.dtype == torch.uint8:
        raise TypeError("to_rgb_array takes float pixels in [-1, 1]; uint8 pixels need only .permute(1, 2, 0)")
    return ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ---- evaluation.json ---------------------------------------------------------------------------


def write_evaluation(folder: str | os.PathLike, results: dict[str, tuple[dict, dict]]) -> Path:
    """Merge `results` ({group: (metrics, settings)}) into `folder/evaluation.json`, shaped
    `{"metrics": {name: float}, "settings": {name: value}}`: each group that ran replaces its own metrics (names
    in METRIC_NAMES and their `_<detail>` forms) and settings (`<group>_...`); other groups' entries stay."""
    path = Path(folder) / EVALUATION_FILE
    merged = {"metrics": {}, "settings": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict) and set(old) == set(merged) and all(isinstance(v, dict) for v in old.values()):
            merged = old
        else:
            print(f"{path}: not a metrics file of this command (an older full report?); replacing it")
    for group, (values, settings) in results.items():
        names = METRIC_NAMES[group]
        merged["metrics"] = {k: v for k, v in merged["metrics"].items()
                             if not any(k == n or k.startswith(n + "_") for n in names)}
        merged["settings"] = {k: v for k, v in merged["settings"].items() if not k.startswith(group + "_")}
        merged["metrics"].update({k: float(v) for k, v in values.items()})
        merged["settings"].update(settings)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ---- the command -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = ToolParser(prog="python -m finetune.evaluate", description=__doc__)
    parser.add_argument("pipeline", help="an output folder of finetune/train.py (a pipeline, or a LoRA on its base) or "
                                         "one of its checkpoint-N folders")
    parser.add_argument("--metrics", nargs="+", choices=METRICS,
                        help="default: adherence when the run trained on the built-in set, and loss when there is "
                             "held-out data (always for the built-in set; else name it with --data)")
    parser.add_argument("--num-images-per-prompt", type=int, default=8, help="adherence: images per prompt")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="adherence, clip, fid: reverse steps")
    parser.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance; default: the run's validation.guidance_scale (else 1)")
    parser.add_argument("--seed", type=int, default=0, help="adherence, clip, fid: sampling seed")
    parser.add_argument("--colors", nargs="+", default=list(DEFAULT_COLORS), choices=list(HUES),
                        help="adherence: the colours to prompt")
    parser.add_argument("--data", nargs="+", default=[], metavar="data.KEY=VALUE",
                        help="held-out data: overrides of the run's data section, e.g. data.path=val/{000..001}.tar "
                             "(default for the built-in set: new renderings of it, in the run's data.colors)")
    parser.add_argument("--max-samples", type=int, default=256, help="held-out pairs to read")
    parser.add_argument("--num-loss-timesteps", type=int, default=10,
                        help="loss: timesteps evenly spaced over [0, T)")
    parser.add_argument("--loss-timesteps", type=int, nargs="+", help="loss: these timesteps instead")
    parser.add_argument("--loss-seed", type=int, default=0, help="loss: the noise seed")
    parser.add_argument("--num-generated", type=int, default=256,
                        help="clip, fid: images generated, one per held-out caption (at most --max-samples)")
    parser.add_argument("--clip-model", help="clip (and fid by default): a local transformers CLIPModel folder")
    parser.add_argument("--fid-model", help="fid: a local transformers vision model folder (default: --clip-model)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="loss, clip, fid: pairs (or images) per forward pass; the numbers do not depend on it")
    parser.add_argument("--device", help="torch device to run on (default: cuda when there is one, else cpu)")
    parser.add_argument("--classes", nargs="+", metavar="NAME[:ALIAS,...]",
                        help="classes: the class words of the run's captions, e.g. zero:0 one:1 ... nine:9")
    parser.add_argument("--class-prompt", default="{}",
                        help="classes: the prompt for a class, {} standing for its name, e.g. 'a handwritten digit {}'")
    parser.add_argument("--class-guidance", type=float, nargs="+",
                        help="classes: the guidance scales to compare (default: --guidance-scale)")
    parser.add_argument("--classifier", help="classes: a local transformers image-classification folder whose labels "
                                             "name the classes (default: fit a judge on the run's training images)")
    parser.add_argument("--fit-samples", type=int, default=2000,
                        help="classes: training images to fit the judge on (a fifth of them measure it)")
    parser.add_argument("--no-save", action="store_true", help=f"do not write <folder>/{EVALUATION_FILE}")
    parser.add_argument("--json", help="also write the full report to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser, parser.parse_args(argv)


def feature_model_paths(wanted: list[str], clip_model: str | None, fid_model: str | None) -> dict[str, tuple]:
    """{metric: (folder, flag)} for the metrics that need a feature model; a missing one is an error that says
    which flag to pass and what to put there (checked before anything is loaded)."""
    paths = {}
    if "clip" in wanted:
        if clip_model is None:
            raise FileNotFoundError("the CLIP score (--metrics clip) needs --clip-model PATH: "
                                    + metrics.CLIP_DOWNLOAD_HINT)
        paths["clip"] = (clip_model, "--clip-model")
    if "fid" in wanted:
        if fid_model is None and clip_model is None:
            raise FileNotFoundError("FID (--metrics fid) needs a feature model on disk: --fid-model PATH (a "
                                    "transformers vision model folder, e.g. DINOv2, in safetensors) or --clip-model "
                                    f"PATH: {metrics.CLIP_DOWNLOAD_HINT}")
        paths["fid"] = (fid_model, "--fid-model") if fid_model else (clip_model, "--clip-model")
    return paths


def choose_metrics(requested: list[str] | None, run: DataConfig, has_held_out: bool) -> list[str]:
    """The requested metrics, or the default: adherence for a run on the built-in set, and the loss when there is
    held-out data."""
    if requested:
        return list(dict.fromkeys(requested))
    return (["adherence"] if run.source == "builtin" and not run.sources else []) + (["loss"] if has_held_out else [])


def report_adherence(pipeline, colors: list[str], num_images_per_prompt: int, num_inference_steps: int,
                     guidance_scale: float, seed: int, progress: bool = False) -> tuple[dict, dict, dict]:
    """Adherence: print it; return the full report, the metrics and the settings."""
    report = evaluate_pipeline(pipeline, tuple(colors), SHAPES, num_images_per_prompt, num_inference_steps,
                               guidance_scale, seed, progress)
    for p in report["per_prompt"]:
        print(f"  {p['prompt']:<18} colour {p['color_ok']:5.0%}  shape {p['shape_ok']:5.0%}")
    by_color = report["color_accuracy_by_color"]
    print("colour accuracy by colour: " + ", ".join(f"{c} {v:.1%}" for c, v in by_color.items()))
    print(f"colour accuracy {report['color_accuracy']:.1%} (prompts mostly right: {report['prompts_color_ok']:.0%}), "
          f"shape accuracy {report['shape_accuracy']:.1%} (prompts mostly right: {report['prompts_shape_ok']:.0%}) "
          f"over {report['num_images']} images, {num_inference_steps} steps, guidance {guidance_scale}")
    values = {"color_accuracy": report["color_accuracy"], "shape_accuracy": report["shape_accuracy"],
              **{f"color_accuracy_{c}": v for c, v in by_color.items()}}
    settings = {"adherence_colors": list(colors), "adherence_num_images_per_prompt": num_images_per_prompt,
                "adherence_num_inference_steps": num_inference_steps, "adherence_guidance_scale": guidance_scale,
                "adherence_seed": seed}
    return report, values, settings


def report_loss(pipeline, pairs: list[dict], data: str, timesteps: list[int], seed: int,
                batch_size: int, progress: bool = False) -> tuple[dict, dict, dict]:
    """The validation loss: print it; return the full report, the metrics and the settings."""
    report = validation_loss(pipeline, pairs, timesteps, seed, batch_size, progress)
    print(f"validation loss {report['mean']:.5f} ({report['prediction_type']} objective) over {len(pairs)} held-out "
          "pairs: " + ", ".join(f"t={t} {v:.4f}" for t, v in report["per_timestep"].items()))
    values = {"validation_loss": report["mean"],
              **{f"validation_loss_t{t}": v for t, v in report["per_timestep"].items()}}
    settings = {"loss_timesteps": timesteps, "loss_seed": seed, "loss_num_samples": len(pairs), "loss_data": data,
                "loss_prediction_type": report["prediction_type"]}
    return report, values, settings


def report_generated(images: list[np.ndarray], pairs: list[dict], models: dict, sampling: dict,
                     batch_size: int) -> dict[str, tuple[dict, dict, dict]]:
    """CLIP score (models["clip"]) and/or FID (models["fid"]) of `images`, generated from the captions of `pairs`,
    against those pairs: print them; return {metric: (full report, metrics, settings)}."""
    results = {}
    if "clip" in models:
        clip = models["clip"]
        scores = metrics.clip_scores(clip.image_features(images, batch_size),
                                     clip.text_features([p["caption"] for p in pairs], batch_size))
        score = float(scores.mean())
        print(f"CLIP score {score:.2f} ({clip.path}) over {len(images)} generated images")
        settings = {"clip_model": clip.path, **{f"clip_{k}": v for k, v in sampling.items()}}
        results["clip"] = ({"clip_score": score, "per_image": scores.tolist()}, {"clip_score": score}, settings)
    if "fid" in models:
        model = models["fid"]
        real = model.image_features([to_rgb_array(p["pixels"]) for p in pairs], batch_size).numpy()
        value = metrics.fid(model.image_features(images, batch_size).numpy(), real)
        features = f"{type(model.model).__name__} {'image embeddings' if model.is_clip else 'pooled features'}"
        print(f"FID {value:.3f} ({features} of {model.path}) between {len(images)} generated and {len(real)} "
              "held-out images")
        settings = {"fid_model": model.path, "fid_features": features, "fid_num_real": len(real),
                    **{f"fid_{k}": v for k, v in sampling.items()}}
        results["fid"] = ({"fid": value, "features": features}, {"fid": value}, settings)
    return results


def report_classes(pipeline, classes: dict[str, list[str]], args, data: DataConfig) -> tuple[dict, dict, dict]:
    """Class adherence at each of --class-guidance: print it; return the full report, the metrics and settings."""
    if args.classifier:
        judge = class_adherence.SuppliedJudge(args.classifier, classes, args.device)
    else:
        pairs, skipped = held_out_pairs(held_out_source(data, args.fit_samples), data, args.fit_samples)
        images, labels, left_out = class_adherence.labelled(pairs, classes, to_rgb_array)
        judge = class_adherence.FittedJudge(images, labels)
        skipped.update(left_out)
        print(f"judge: {judge.description} ({describe_data(data)}" + (f"; left out: {dict(skipped)})" if skipped
                                                                      else ")"))
    prompted = [name for name in classes for _ in range(args.num_images_per_prompt)]
    prompts = [args.class_prompt.format(name) for name in prompted]
    report, values = {"judge": judge.description, "judge_accuracy": judge.accuracy, "by_guidance": {}}, {}
    for guidance in args.class_guidance or [args.guidance_scale]:
        images = generate_images(pipeline, prompts, args.num_inference_steps, guidance, args.seed, args.batch_size,
                                 not args.quiet)
        result = class_adherence.adherence(judge, images, prompted)
        report["by_guidance"][str(guidance)] = result
        values.setdefault("class_adherence", result["adherence"])
        values[f"class_adherence_guidance_{guidance:g}"] = result["adherence"]
        print(f"class adherence {result['adherence']:.1%} at guidance {guidance:g} over {len(images)} images: "
              + ", ".join(f"{name} {v:.0%}" for name, v in result["by_class"].items()))
    if judge.accuracy is not None:
        values["class_judge_accuracy"] = judge.accuracy
    settings = {"classes_names": classes, "classes_prompt": args.class_prompt, "classes_judge": judge.description,
                "classes_num_images_per_class": args.num_images_per_prompt,
                "classes_num_inference_steps": args.num_inference_steps, "classes_seed": args.seed,
                "classes_guidance": args.class_guidance or [args.guidance_scale]}
    return report, values, settings


def load_feature_models(paths: dict[str, tuple], device: str) -> dict:
    """The feature model of each metric in `paths` ({metric: (folder, flag)}); one folder is loaded once."""
    models = {}
    for metric, (path, flag) in paths.items():
        same = [models[m] for m, (other, _) in paths.items() if m in models and other == path]
        models[metric] = same[0] if same else metrics.load_feature_model(path, flag, metric == "clip", device)
    return models


def save_report(report: dict, groups: dict[str, tuple[dict, dict]], folder: str, json_path: str | None,
                save: bool) -> None:
    """Merge each group's (metrics, settings) into `folder/evaluation.json` (unless not `save`), and write the full
    `report` to `json_path` (unless that is the metrics file itself, which scripts used to name with --json)."""
    summary = Path(folder) / EVALUATION_FILE
    if save:
        print(f"evaluation: {write_evaluation(folder, groups)}")
    if json_path and save and Path(json_path).resolve() == summary.resolve():
        print(f"--json {json_path}: that is the metrics file this command writes anyway; the full report is not "
              "written there (give --json another path for it)")
    elif json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)


def main(argv: list[str] | None = None) -> dict:
    parser, args = parse_args(argv)
    hide_library_progress()
    try:  # a missing feature model is reported before anything loads
        paths = feature_model_paths(args.metrics or [], args.clip_model, args.fid_model)
    except FileNotFoundError as error:
        parser.error(str(error))
    args.pipeline = str(result_folder(args.pipeline))  # a checkpoint: its export
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.guidance_scale is None:
        args.guidance_scale = run_guidance_scale(args.pipeline)

    # Load the model; find the held-out data and the metrics to compute; load the feature models.
    try:
        pipeline = load_result(args.pipeline).to(args.device)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load {args.pipeline}: {error}") from error
    pipeline.set_progress_bar_config(disable=True)
    T = pipeline.scheduler.config.num_train_timesteps
    try:
        resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        run_data, data = held_out_data(args.pipeline, args.data, resolution)
        has_held_out = not is_training_data(run_data, data)
        wanted = choose_metrics(args.metrics, run_data, has_held_out)
        if not has_held_out and {"loss", "clip", "fid"} & set(wanted):
            raise ValueError(f"{', '.join(m for m in wanted if m != 'adherence')}: needs held-out data, but the run "
                             f"trained on {describe_data(run_data)}; name held-out pairs with --data, e.g. --data "
                             "data.path=val-shards/{000..001}.tar (or data.split=validation for hf)")
        if min(args.max_samples, args.batch_size, args.num_generated) < 1 or ("fid" in wanted and min(
                args.max_samples, args.num_generated) < 2):
            raise ValueError("--max-samples, --num-generated and --batch-size must be >= 1, and FID needs at least 2 "
                             "images on each side (and many more to mean much)")
        timesteps = args.loss_timesteps or metrics.loss_timesteps(T, args.num_loss_timesteps)
        if any(not 0 <= t < T for t in timesteps):
            raise ValueError(f"--loss-timesteps {' '.join(map(str, timesteps))}: each must be in [0, {T})")
        models = load_feature_models(paths, args.device)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if "classes" in wanted:  # its mistakes before any image is drawn
        classes = class_adherence.parse_classes(args.classes or [])
        if "{}" not in args.class_prompt:
            parser.error(f"--class-prompt {args.class_prompt!r}: put {{}} where the class name goes")
    if args.metrics is None and not has_held_out:
        print("validation loss: not computed; the run's data is its training data, name held-out pairs with --data")

    # Compute each metric: {metric: (its full report, its metrics, its settings)}.
    groups = {}
    if "adherence" in wanted:
        groups["adherence"] = report_adherence(pipeline, args.colors, args.num_images_per_prompt,
                                               args.num_inference_steps, args.guidance_scale, args.seed,
                                               not args.quiet)
    if "classes" in wanted:
        groups["classes"] = report_classes(pipeline, classes, args, data)
    if {"loss", "clip", "fid"} & set(wanted):
        pairs, skipped = held_out_pairs(held_out_source(data, args.max_samples), data, args.max_samples)
        described = describe_data(data)
        print(f"held-out data: {len(pairs)} pairs from {described}" + (f"; left out: {dict(skipped)}" if skipped
                                                                      else ""))
    if "loss" in wanted:
        groups["loss"] = report_loss(pipeline, pairs, described, timesteps, args.loss_seed, args.batch_size,
                                     not args.quiet)
    if models:
        pairs = pairs[:args.num_generated]
        print(f"generating {len(pairs)} images from held-out captions")
        images = generate_images(pipeline, [p["caption"] for p in pairs], args.num_inference_steps,
                                 args.guidance_scale, args.seed, args.batch_size, not args.quiet)
        sampling = {"num_images": len(images), "num_inference_steps": args.num_inference_steps,
                    "guidance_scale": args.guidance_scale, "seed": args.seed, "data": described}
        groups.update(report_generated(images, pairs, models, sampling, args.batch_size))

    # Report: the adherence report at the top level (as before), the others by name, the metrics and settings.
    report = dict(groups["adherence"][0]) if "adherence" in groups else {}
    report.update({name: group[0] for name, group in groups.items() if name != "adherence"})
    report["metrics"] = {k: v for _, values, _ in groups.values() for k, v in values.items()}
    report["settings"] = {k: v for _, _, settings in groups.values() for k, v in settings.items()}
    save_report(report, {name: group[1:] for name, group in groups.items()}, args.pipeline, args.json,
                not args.no_save)
    return report


if __name__ == "__main__":
    cli.run(main)
