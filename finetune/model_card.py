"""The model card (README.md) of a run's output folder as a Hub repository: Hub metadata in YAML front matter, then
what was trained, the final sample grid and its prompts, the code that loads the output downstream and draws that
grid again, the training settings and the evaluation numbers. `finetune.hub` writes it before each push."""

import json
import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, hf_hub_download

from . import single_file
from .config import DataConfig, LoraConfig, ModelConfig, TrainConfig, ValidationConfig, load_config

try:  # huggingface_hub 2.x talks HTTP through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE, as finetune/lora.py writes it
LYCORIS_WEIGHTS = "lycoris_adapters.safetensors"  # a LoHa / LoKr run's (finetune/lora.py)
KOHYA_WEIGHTS = "lora_kohya.safetensors"  # the kohya layout of the same adapters (finetune/kohya.py)
# The code a pipeline folder of this project ships (TextToImageDDPMPipeline.save_pretrained writes model_index.json's
# `_class_name` as [module, class] and copies the files), and what each file does.
PROJECT_PIPELINE = ["pipeline_text2image_ddpm", "TextToImageDDPMPipeline"]
PROJECT_CODE = {
    "pipeline_text2image_ddpm.py": "the pipeline: it encodes the prompt with the text encoder, runs the reverse "
                                   "diffusion loop with the UNet, with classifier-free guidance, and decodes the "
                                   "images",
    "scheduler/scheduling_ddpm.py": "the DDPM scheduler: the noise schedule and the reverse step",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def model_card(output_dir: str | os.PathLike, repo_id: str, *, revision: str | None = None,
               license: str | None = None, num_processes: int | None = None) -> str:
    """The README.md of a run's output folder as `repo_id` (at branch `revision`): Hub metadata in YAML front matter,
    then the final sample grid and its prompts, the code that loads this output downstream, the training settings
    and, when the folder has an evaluation.json, its metrics. `num_processes` defaults to what the latest checkpoint
    recorded."""
    folder = Path(output_dir)
    config = load_config(folder / "config.yaml")
    model, lora = config.model, config.lora
    metadata = card_metadata(model, config.data, lora, license)
    # The model_index.json of what from_pretrained loads: this output or, for a LoRA, its base.
    loaded = (model.pretrained_model_name_or_path, model.revision) if lora.enabled else (str(folder), None)
    index = base_index(model) if lora.enabled and single_file.is_single_file(loaded[0]) else read_model_index(*loaded)
    body = "\n\n".join(part for part in [
        f"# {repo_id.split('/')[-1]}",
        describe(model, lora, kohya=(folder / KOHYA_WEIGHTS).is_file()),
        samples_section(final_grid(folder), config.validation),
        usage_section(repo_id, revision, model, lora, config.validation, index, config.train.mixed_precision),
        training_section(config.train, config.data, model, lora, num_processes or recorded_num_processes(folder)),
        evaluation_section(folder / "evaluation.json"),
    ] if part)
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}\n"))  # parsing it back checks the metadata


def card_metadata(model: ModelConfig, data: DataConfig, lora: LoraConfig, license: str | None) -> ModelCardData:
    """The Hub metadata: library, task, tags, and the base model and dataset when they are on the Hub (a local
    folder is no valid `base_model` / `datasets` entry)."""
    base = model.pretrained_model_name_or_path
    named = [(data.source, data.path), *((entry.get("source"), entry.get("path")) for entry in data.sources)]
    hub_datasets = [path for source, path in named if source == "hf" and path and is_hub_id(path)]
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        base_model=base if base and is_hub_id(base) else None,
        license=license,
        datasets=hub_datasets or None,  # (each hf dataset of data.sources too)
        tags=["text-to-image", "diffusers", "diffusers-training", *(["lora"] if lora.enabled else []), "ddpm"],
    )


def is_hub_id(name: str) -> bool:
    """Whether `name` names a Hub repository (`name` or `namespace/name`) rather than a local folder or file."""
    return bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name)


def describe(model: ModelConfig, lora: LoraConfig, kohya: bool = False) -> str:
    """One paragraph: what was trained, from what (with `kohya`: the adapters' file for other tools too)."""
    what = "A text-to-image denoising diffusion model (DDPM): a text-conditioned UNet noise predictor"
    base = model.pretrained_model_name_or_path
    if base is None:
        return f"{what} and its text encoder, trained from scratch."
    if lora.enabled:
        text = (f" and the text encoder (rank {lora.text_encoder_rank}, alpha "
                f"{lora.text_encoder_alpha or lora.text_encoder_rank:g})" if lora.train_text_encoder else "")
        return (f"LoRA adapters for {_base_reference(base)}: rank {lora.rank}, alpha {lora.alpha or lora.rank:g}, on "
                f"the UNet's {', '.join(f'`{m}`' for m in lora.target_modules)}{text}"
                f"{' (DoRA)' if lora.use_dora else ''}. This repository holds the adapters only (`{LORA_WEIGHTS}`"
                + (f"; the same adapters in the kohya layout that ComfyUI, AUTOMATIC1111 and Forge load: "
                   f"`{KOHYA_WEIGHTS}`" if kohya else "") + "); they load onto the base.")
    frozen = "" if model.train_text_encoder else " (the text encoder frozen)"
    return f"{what}, fine-tuned in full from {_base_reference(base)}{frozen}."


def _base_reference(base: str) -> str:
    return f"[{base}](/{base})" if is_hub_id(base) else f"the local pipeline `{base}`"


def final_grid(folder: Path) -> tuple[int, str] | None:
    """The step and repository path of the last sample grid (`samples/step-<N>.png`), or None without one."""
    grids = [(int(m[1]), f"samples/{p.name}") for p in (folder / "samples").glob("step-*.png")
             if (m := re.fullmatch(r"step-(\d+)\.png", p.name))]
    return max(grids) if grids else None


def samples_section(grid: tuple[int, str] | None, validation: ValidationConfig) -> str:
    prompts = "\n".join(f"{i}. {row.prompt}" + (f" (seed {row.seed}, guidance {row.guidance_scale}"
                                                 + (f", negative prompt: {row.negative_prompt}" if row.negative_prompt
                                                    else "") + ")" if validation.per_prompt else "")
                         for i, row in enumerate(validation.rows(), 1))
    settings = (f"{validation.num_images_per_prompt} images per prompt, "
                + ("each prompt with its seed and guidance" if validation.per_prompt else
                   f"seed {validation.seed}") + f", {validation.num_inference_steps} reverse steps"
                + ("" if validation.per_prompt else f", guidance {validation.guidance_scale}"))
    if grid is None:
        return f"## Samples\n\nThe output folder had no sample grid. Validation prompts ({settings}):\n\n{prompts}"
    step, path = grid
    return (f"## Samples\n\n![sample grid at step {step}]({path})\n\n"
            f"The final grid, at step {step}: one row per prompt, {settings}.\n\n{prompts}")


def base_index(model: ModelConfig) -> dict | None:
    """The model_index.json of a single-file base's conversion (which the run made), None without one."""
    try:
        folder = single_file.conversion(model.pretrained_model_name_or_path, model.single_file_config)
    except OSError:
        return None
    return _json_or_none(lambda: folder / "model_index.json")


def read_model_index(pipeline: str, revision: str | None = None) -> dict | None:
    """A pipeline's model_index.json: from its folder or, for a Hub id, from the local cache (a run that trained on
    that base downloaded it), else from the Hub; None when it cannot be read."""
    if os.path.isdir(pipeline):
        return _json_or_none(lambda: Path(pipeline) / "model_index.json")
    return (_json_or_none(lambda: hf_hub_download(pipeline, "model_index.json", revision=revision,
                                                  local_files_only=True))
            or _json_or_none(lambda: hf_hub_download(pipeline, "model_index.json", revision=revision)))


def _json_or_none(locate) -> dict | None:
    """The JSON object in the file at `locate()`; None when that fails (not cached, offline, unreachable, not found,
    not a JSON object)."""
    try:
        value = json.loads(Path(locate()).read_text())
    except (OSError, ValueError, TransportError):
        return None
    return value if isinstance(value, dict) else None


def pipeline_code(index: dict | None) -> str:
    """What loading a pipeline runs, as its model_index.json says: "project" (this project's code, which the folder
    ships), "stock" (a diffusers class), "other" (another pipeline's own code) or "unknown" (no model_index.json).
    (A stock pipeline with a custom component needs trust_remote_code too; diffusers says so, and runs nothing.)"""
    if index is None:
        return "unknown"
    name = index.get("_class_name")
    return "project" if name == PROJECT_PIPELINE else "other" if isinstance(name, list) else "stock"


def code_note(index: dict | None, subject: str, where: str) -> str:
    """What the card says about the code that loading `subject` ("the base", "this repository") runs: for this
    project's code, which files they are and what they do; for code it cannot vouch for, to read it first."""
    code = pipeline_code(index)
    if code == "project":
        ships_scheduler = (index.get("scheduler") or [None])[0] == "scheduling_ddpm"
        files = [name for name in PROJECT_CODE if ships_scheduler or not name.startswith("scheduler/")]
        listed = " and ".join(f"`{name}` ({PROJECT_CODE[name]})" for name in files)
        return (f"`trust_remote_code=True` runs the Python files {subject} ships, as finetune-ddpm writes them: "
                f"{listed}. Read them {where} before you run them.")
    if code == "other":
        return (f"{subject.capitalize()} ships pipeline code of its own (`{index['_class_name'][0]}.py`, not this "
                "project's), so the code above leaves out the `trust_remote_code=True` it needs: read that code "
                f"{where} before you trust it.")
    if code == "unknown":
        return (f"{subject.capitalize()} could not be inspected when this card was written (its model_index.json "
                "could not be read), so the code above loads it without `trust_remote_code`: if it ships custom "
                f"code (diffusers then asks for `trust_remote_code=True`), read that code {where} before you trust "
                "it.")
    return ""


def usage_section(repo_id: str, revision: str | None, model: ModelConfig, lora: LoraConfig,
                  validation: ValidationConfig, index: dict | None, mixed_precision: str) -> str:
    """The code that loads this output (for a LoRA: its base, then the adapters) and draws the final grid's images.
    `index` is the model_index.json of what `from_pretrained` loads (this output, or the LoRA's base), None when it
    could not be read: `trust_remote_code=True` only for a pipeline that ships this project's code."""
    at = f", revision={_py(revision)}" if revision else ""
    trust = ", trust_remote_code=True" if pipeline_code(index) == "project" else ""
    pipeline_class = "DiffusionPipeline"
    if lora.enabled:
        base = model.pretrained_model_name_or_path
        base_kwargs = "".join(f", {k}={_py(v)}" for k, v in (("revision", model.revision), ("variant", model.variant))
                              if v)
        load = f"pipe = DiffusionPipeline.from_pretrained({_py(base)}{base_kwargs}{trust})\n"
        notes = [code_note(index, "the base", f"in {_base_reference(base)}")]
        if single_file.is_single_file(base):  # (diffusers' own pipeline, which reads the original layout)
            pipeline_class = (index or {}).get("_class_name", "StableDiffusionPipeline")
            load = f"pipe = {pipeline_class}.from_single_file({_py(base)})\n"
            notes = [f"The base was the single-file checkpoint `{base}`: put your own path to it (or its URL) in its "
                     "place; `from_single_file` reads the base's configs from the Hub the first time."]
        elif not is_hub_id(base):
            notes.append(f"The base was the local folder `{base}`: put its Hub id (or your own path to it) in its "
                         "place.")
        load += f"pipe.load_lora_weights({_py(repo_id)}, weight_name={_py(LORA_WEIGHTS)}{at})"
        needs = "torch, diffusers, transformers and peft"  # load_lora_weights needs peft
    else:
        load = f"pipe = DiffusionPipeline.from_pretrained({_py(repo_id)}{at}{trust})"
        notes = [code_note(index, "this repository", "here")]
        needs = "torch, diffusers and transformers"
    exact = ("exactly" if mixed_precision == "no" else
             f"up to rounding (the run sampled under {mixed_precision} autocast)")
    return (
        f"## Use it\n\nWith {needs} (this project is not needed):\n\n```python\n"
        f"import torch\nfrom diffusers import {pipeline_class}\n\n"
        f"{load}\n{sampling_code(validation)}```\n\n"
        f"With the run's settings, this draws the grid above {exact}."
        + "".join(f"\n\n{note}" for note in notes if note)
    )


def sampling_code(validation: ValidationConfig) -> str:
    """The call that draws the validation grid's images into `images`, as `validation.sample_grid` does: all prompts
    in one call, or a call per prompt with its own settings."""
    counts = (f"num_images_per_prompt={validation.num_images_per_prompt},\n",
              f"num_inference_steps={validation.num_inference_steps},\n")
    if not validation.per_prompt:
        return (f"images = pipe(\n    {_py(validation.texts)},\n" + "".join(f"    {c}" for c in counts)
                + f"    guidance_scale={validation.guidance_scale},\n"
                f"    generator=torch.Generator().manual_seed({validation.seed}),\n).images\n")
    rows = "".join(f"    ({_py(r.prompt)}, {_py(r.negative_prompt) if r.negative_prompt else None}, "
                   f"{r.guidance_scale}, {r.seed}),\n" for r in validation.rows())
    return (f"images = []\nfor prompt, negative_prompt, guidance_scale, seed in [\n{rows}]:\n"
            "    images += pipe(\n        prompt,\n        negative_prompt=negative_prompt,\n"
            + "".join(f"        {c}" for c in counts)
            + "        guidance_scale=guidance_scale,\n        generator=torch.Generator().manual_seed(seed),\n"
            "    ).images\n")


def _py(value) -> str:
    """A Python literal for a string or a list of strings, in double quotes."""
    return json.dumps(value, ensure_ascii=False)


def recorded_num_processes(folder: Path) -> int | None:
    """The number of processes the run trained with, as its latest checkpoint's manifest recorded it."""
    steps = {int(p.parent.name.split("-")[1]): p for p in folder.glob("checkpoint-*/manifest.json")
             if re.fullmatch(r"checkpoint-\d+", p.parent.name)}
    return json.loads(steps[max(steps)].read_text()).get("world_size") if steps else None


def training_section(train: TrainConfig, data: DataConfig, model: ModelConfig, lora: LoraConfig,
                     num_processes: int | None) -> str:
    """The settings that made this output, as a table; the full resolved config is config.yaml."""
    per_step = train.train_batch_size * train.gradient_accumulation_steps
    batch = (f"{per_step * num_processes} ({train.train_batch_size} per process x {train.gradient_accumulation_steps} "
             f"accumulation x {num_processes} process{'es' * (num_processes > 1)})" if num_processes else
             f"{per_step} per process ({train.train_batch_size} x {train.gradient_accumulation_steps} accumulation)")
    rows = {
        "steps": train.max_train_steps,
        "effective batch": batch,
        "resolution": f"{data.resolution} px",
        "learning rate": f"{train.learning_rate:g} peak, {train.lr_scheduler} schedule, {train.lr_warmup_steps} "
                         "warm-up steps",
        "precision": {"no": "fp32"}.get(train.mixed_precision, train.mixed_precision),
        "EMA": f"on (max decay {train.ema_max_decay})" if train.use_ema else "off",
    }
    if lora.enabled:
        rows["LoRA"] = f"rank {lora.rank}, alpha {lora.alpha or lora.rank:g}, on {', '.join(lora.target_modules)}"
        if lora.train_text_encoder:
            rows["LoRA, text encoder"] = (f"rank {lora.text_encoder_rank}, alpha "
                                          f"{lora.text_encoder_alpha or lora.text_encoder_rank:g}, on "
                                          f"{', '.join(lora.text_encoder_target_modules)}")
    else:
        rows["text encoder"] = "trained" if model.train_text_encoder else "frozen"
    if train.snr_gamma:
        rows["min-SNR gamma"] = train.snr_gamma
    if data.sources:
        rows["data"] = ", ".join(f"{entry.get('source')} `{entry.get('path', 'built-in shapes')}`" for entry in
                                 data.sources)
    elif data.source == "builtin":
        rows["data"] = "built-in shapes" + (f" ({data.num_samples} samples)" if data.num_samples else "")
    else:
        rows["data"] = f"{data.source} `{data.path}`"
    table = "\n".join(f"| {key} | {value} |" for key, value in rows.items())
    return (f"## Training\n\nTrained with finetune-ddpm (`finetune/train.py`); the whole resolved config is "
            f"[config.yaml](config.yaml).\n\n| setting | value |\n|---|---|\n{table}")


def evaluation_section(path: Path) -> str:
    """The metrics of `python -m finetune.evaluate` (evaluation.json: {"metrics": {...}, "settings": {...}}) as a
    table, without the per-timestep losses (`validation_loss_t<t>`); empty without the file or without metrics."""
    report = json.loads(path.read_text()) if path.is_file() else {}
    metrics, settings = report.get("metrics") or {}, report.get("settings") or {}
    metrics = {name: value for name, value in metrics.items() if not re.fullmatch(r"validation_loss_t\d+", name)}
    if not metrics:
        return ""
    table = "\n".join(f"| {name} | {_number(value)} |" for name, value in metrics.items())
    text = (f"## Evaluation\n\nFrom `evaluation.json` (`python -m finetune.evaluate`):\n\n| metric | value |\n"
            f"|---|---|\n{table}")
    if settings:
        text += "\n\nSettings: " + ", ".join(f"{name} {_number(value)}" for name, value in settings.items()) + "."
    return text


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
