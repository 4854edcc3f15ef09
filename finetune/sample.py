"""Sample images from a trained run (or any pipeline folder): one PNG per image, a grid, and the settings used.

    python -m finetune.sample outputs/shapes "a red circle" "a blue square"
    python -m finetune.sample outputs/shapes --prompts-file prompts.txt --num-images-per-prompt 8 --seed 3
    python -m finetune.sample outputs/shapes "a green triangle" --scheduler ddim --num-inference-steps 20
    python -m finetune.sample outputs/shapes-lora "a purple circle" --lora-scale 0.5
    python -m finetune.sample outputs/shapes "a purple circle" --lora outputs/shapes-lora --guidance-scale 2
    python -m finetune.sample outputs/shapes/checkpoint-1000 "a red circle"      # a checkpoint: exported first

The folder is a run's output: a pipeline, or a LoRA output (its base is read from the run's config.yaml), or one of
its checkpoints (`checkpoint-N`), exported first as the trainer would have exported it at that step (into
`checkpoint-N/pipeline`, reused after; see `python -m finetune.export`). With `--lora`, adapters are loaded onto
the folder's pipeline; `--lora-scale` weights every loaded adapter (diffusers' `set_adapters(...,
adapter_weights=...)`: 0 draws the base's images, 1 the adapters' own).

A prompts file has one prompt per line; blank lines and lines starting with `#` are skipped.

Image j of every prompt starts from seed `--seed + j` (its own generator), so a column of the grid shares its
noise, the file name says the seed, and the same command writes the same images. `--scheduler` swaps the reverse
process for one of diffusers' schedulers, built from the saved scheduler's config (the noise schedule and
prediction type the model was trained with); without it the pipeline's own scheduler samples, as in training.

Writes `<prompt index>-<prompt>-<image index>-seed<seed>.png` per image, `grid.png` (one row per prompt) and
`settings.json` into `--output-dir` (default: `<folder>/samples/sampled/`; for a checkpoint, in its export); files a
previous run of this command listed in that folder's settings.json are removed first, so the folder holds one run.
A progress bar counts the images (`--quiet`: none).
"""

import argparse
import inspect
import json
import re
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image
from tqdm.auto import tqdm

from pipelines import TextToImageDDPMPipeline

from .cli import ToolParser, UserError, run
from .lora import WEIGHT_NAME as LORA_WEIGHTS
from .results import hide_library_progress, load_result, result_folder, run_guidance_scale
from .validation import make_grid

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
SETTINGS = "settings.json"


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file: one per line, stripped; blank lines and `#` comments skipped."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def slug(text: str, max_chars: int = 40) -> str:
    """A file-name-safe form of a prompt: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_chars].rstrip("-") or "empty"


def swap_scheduler(pipeline: TextToImageDDPMPipeline, name: str) -> None:
    """Replace the pipeline's scheduler with diffusers' `name` scheduler, built from the current one's config.

    Every saved key the new class takes is passed on explicitly: diffusers' `from_config` would otherwise give
    the new class its own defaults for the keys the old one left at default (`_use_default_values`), and the
    noise schedule must stay the one the model was trained with. `variance_type` is DDPM's alone (in
    DPM-Solver the name means a model that predicts its variance), so only DDPM gets it."""
    cls = SCHEDULERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if cls is not DDPMScheduler:
        accepted.discard("variance_type")
    config = {k: v for k, v in pipeline.scheduler.config.items() if k in accepted}
    pipeline.scheduler = cls.from_config(config)


def adapter_names(pipeline: TextToImageDDPMPipeline) -> list[str]:
    """The LoRA adapters loaded on any component of the pipeline."""
    return sorted({name for names in pipeline.get_list_adapters().values() for name in names})


def set_lora_scale(pipeline: TextToImageDDPMPipeline, scale: float) -> list[str]:
    """Weight every loaded adapter by `scale` (not fused: the base weights stay as they are); return their names."""
    names = adapter_names(pipeline)
    pipeline.set_adapters(names, adapter_weights=[scale] * len(names))
    return names


def generate(pipeline: TextToImageDDPMPipeline, prompts: list[str], num_images_per_prompt: int = 4,
             num_inference_steps: int = 50, guidance_scale: float = 1.0, seed: int = 0,
             negative_prompt: str | None = None, progress: bool = False) -> list[list[Image.Image]]:
    """For each prompt, `num_images_per_prompt` images; image j is drawn with a generator seeded `seed + j`. With
    `progress`, a bar counts the images (on stderr); the pipeline's own per-image bars stay off."""
    pipeline.set_progress_bar_config(disable=True)
    rows = []
    with tqdm(total=len(prompts) * num_images_per_prompt, desc="sampling", unit="image", disable=not progress) as bar:
        for prompt in prompts:
            generators = [torch.Generator().manual_seed(seed + j) for j in range(num_images_per_prompt)]
            rows.append(pipeline(prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                                 generator=generators, output_type="pil").images)
            bar.update(num_images_per_prompt)
    return rows


def save_samples(rows: list[list[Image.Image]], prompts: list[str], seed: int, output_dir: Path,
                 settings: dict) -> dict:
    """Write every image, the grid and the settings (with the files written) into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous(output_dir)
    files = []
    for i, (prompt, images) in enumerate(zip(prompts, rows)):
        for j, image in enumerate(images):
            name = f"{i:02d}-{slug(prompt)}-{j:02d}-seed{seed + j}.png"
            image.save(output_dir / name)
            files.append(name)
    make_grid([image for images in rows for image in images], columns=len(rows[0])).save(output_dir / "grid.png")
    settings = {**settings, "grid": "grid.png", "images": files}
    (output_dir / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return settings


def _remove_previous(output_dir: Path) -> None:
    """Remove the images an earlier run of this command wrote here (as its settings.json lists them)."""
    try:
        previous = json.loads((output_dir / SETTINGS).read_text())
        names = [*previous.get("images", []), previous.get("grid")]
    except (OSError, ValueError, AttributeError):
        return
    for name in names:
        if isinstance(name, str) and name == Path(name).name and name.endswith(".png"):  # only files of ours
            (output_dir / name).unlink(missing_ok=True)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = ToolParser(prog="python -m finetune.sample", description=__doc__)
    parser.add_argument("folder", help="a run's output folder (a pipeline, or a LoRA output), one of its checkpoint-N "
                                       "folders, or any pipeline folder")
    parser.add_argument("prompts", nargs="*", help="prompts to draw (one grid row each)")
    parser.add_argument("--prompts-file", help="more prompts, one per line (blank lines and # comments skipped)")
    parser.add_argument("--negative-prompt", help="what guidance steers away from (default: the empty caption)")
    parser.add_argument("--num-images-per-prompt", type=int, default=4, help="images per prompt (grid columns)")
    parser.add_argument("--num-inference-steps", type=int, default=50,
                        help="reverse-process steps (at most the model's training timesteps)")
    parser.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance (1: off); default: the run's validation.guidance_scale, else 1")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS),
                        help="sample with this diffusers scheduler instead of the pipeline's own")
    parser.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j")
    parser.add_argument("--lora", help="a LoRA output folder (or its .safetensors file) to load onto the pipeline")
    parser.add_argument("--lora-scale", type=float,
                        help="weight of the loaded adapters (0: the base, 1: the adapters as trained; default 1)")
    parser.add_argument("--device", help="torch device to sample on (default: cuda when there is one, else cpu)")
    parser.add_argument("--output-dir", help="where to write (default: FOLDER/samples/sampled)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser, parser.parse_intermixed_args(argv)


def lora_location(path: Path) -> tuple[Path, str] | str:
    """(folder, weight file name) of a LoRA given as a folder or a .safetensors file, or why it is not one."""
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent, path.name
    if (path / LORA_WEIGHTS).is_file():
        return path, LORA_WEIGHTS
    return f"--lora {path}: no adapter weights there (expected {LORA_WEIGHTS} in the folder, or a .safetensors file)"


def main(argv: list[str] | None = None) -> Path:
    parser, args = parse_args(argv)
    hide_library_progress()
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            prompts += read_prompts(args.prompts_file)
        except OSError as error:
            parser.error(f"--prompts-file: {error}")
    if not prompts:
        parser.error("no prompts: give them as arguments or in --prompts-file (blank lines and # comments are skipped)")
    if args.num_images_per_prompt < 1:
        parser.error(f"--num-images-per-prompt must be >= 1, got {args.num_images_per_prompt}")
    lora = lora_location(Path(args.lora)) if args.lora else None
    if isinstance(lora, str):
        parser.error(lora)
    if args.guidance_scale is not None and args.guidance_scale < 0:
        parser.error(f"--guidance-scale must be >= 0 (1 disables guidance), got {args.guidance_scale}")
    folder = result_folder(args.folder)  # a checkpoint: its export
    if args.guidance_scale is None:  # the run that trained the adapters knows best, then the folder's run
        trained = args.lora if args.lora and Path(args.lora, "config.yaml").is_file() else folder
        args.guidance_scale = run_guidance_scale(trained)

    # Load the pipeline (a LoRA output: its base with the adapters), then the extra adapters, scale, scheduler.
    try:
        pipeline = load_result(str(folder))
        if lora:
            pipeline.load_lora_weights(str(lora[0]), weight_name=lora[1], adapter_name="lora")
    except (OSError, ValueError) as error:
        raise UserError(f"could not load {folder}{f' with --lora {args.lora}' if lora else ''}: {error}") from error
    pipeline.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapters = adapter_names(pipeline)
    if args.lora_scale is not None:
        if not adapters:
            parser.error("--lora-scale: no LoRA is loaded; give a LoRA output folder or --lora")
        set_lora_scale(pipeline, args.lora_scale)
    if args.scheduler:
        swap_scheduler(pipeline, args.scheduler)
    num_train_timesteps = pipeline.scheduler.config.num_train_timesteps
    if not 1 <= args.num_inference_steps <= num_train_timesteps:
        parser.error(f"--num-inference-steps must be between 1 and the {num_train_timesteps} timesteps the model was "
                     f"trained with, got {args.num_inference_steps}")

    # Sample and write.
    rows = generate(pipeline, prompts, args.num_images_per_prompt, args.num_inference_steps, args.guidance_scale,
                    args.seed, args.negative_prompt, progress=not args.quiet)
    output_dir = Path(args.output_dir) if args.output_dir else folder / "samples" / "sampled"
    lora_scale = (1.0 if args.lora_scale is None else args.lora_scale) if adapters else None
    settings = {
        "folder": args.folder, "lora": args.lora, "lora_scale": lora_scale, "adapters": adapters,
        "prompts": prompts, "negative_prompt": args.negative_prompt,
        "scheduler": type(pipeline.scheduler).__name__, "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale, "seed": args.seed, "num_images_per_prompt": args.num_images_per_prompt,
    }
    save_samples(rows, prompts, args.seed, output_dir, settings)
    print(f"wrote {len(prompts) * args.num_images_per_prompt} images, grid.png ({len(prompts)} rows x "
          f"{args.num_images_per_prompt}) and {SETTINGS} to {output_dir}")
    return output_dir


if __name__ == "__main__":
    run(main)
