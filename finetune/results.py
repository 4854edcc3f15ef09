"""A finished run's output folder, read back: the pipeline it wrote (or its LoRA on the base), whether a folder
is one (or a checkpoint, exported first), and the settings it sampled with. Shared by the sample, evaluate and
visualise commands."""

import json
from pathlib import Path

import diffusers
import huggingface_hub
import transformers
from diffusers import DiffusionPipeline

from pipelines import TextToImageDDPMPipeline

from . import checkpointing, embeddings
from .cli import UserError
from .config import load_config
from .lora import LYCORIS_WEIGHTS, is_adapter_output, load_adapters
from .lora import WEIGHT_NAME as LORA_WEIGHTS
from .models import base_folder, sdxl_pipeline_class


def run_guidance_scale(folder: str) -> float:
    """The guidance the run sampled its validation grids with (its saved config), or 1 without one."""
    path = Path(folder) / "config.yaml"
    return load_config(path).validation.guidance_scale if path.is_file() else 1.0


def check_folder(folder: Path) -> str | None:
    """Why `folder` cannot be sampled from, or None."""
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if is_adapter_output(folder):
        if not (folder / "config.yaml").is_file():
            return (f"{folder} holds LoRA weights but no config.yaml naming their base; pass the base pipeline "
                    f"folder and --lora {folder}")
        return None
    if (folder / "model_index.json").is_file() or checkpointing.is_checkpoint(folder) or on_a_base(folder):
        return None
    if (folder / "model.safetensors").is_file():
        return (f"{folder} looks like a training checkpoint without its {checkpointing.MANIFEST}, which is written "
                "last: it was not saved completely; pass another checkpoint-N folder")
    return (f"{folder} is neither a pipeline (no model_index.json), a LoRA output (no {LORA_WEIGHTS}) nor a training "
            f"checkpoint (no {checkpointing.MANIFEST}); pass the train.output_dir of a finished run or one of its "
            "checkpoint-N folders")


def result_folder(folder: str | Path) -> Path:
    """The folder to load: `folder` itself, or for a training checkpoint its export (`python -m finetune.export`,
    written on first use and reused after), said in one line. A folder that is neither is a UserError."""
    folder = Path(folder)
    problem = check_folder(folder)
    if problem:
        raise UserError(problem)
    if not checkpointing.is_checkpoint(folder):
        return folder
    from .export import EXPORTED_FROM, exported_checkpoint  # here: export -> validation -> visualize -> us

    out, written = exported_checkpoint(folder)
    step = json.loads((out / EXPORTED_FROM).read_text())["step"]
    print(f"{folder} is a training checkpoint (step {step}): "
          f"{'exported it, as the trainer would have at that step, to' if written else 'using its export in'} {out}")
    return out


def hide_library_progress() -> None:
    """No progress bars from diffusers, transformers and the Hub (loading components, writing shards): the commands
    show their own."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def on_a_base(folder: str | Path) -> bool:
    """Whether `folder` holds what loads onto a base (LoRA adapters, or a textual-inversion run's embedding files),
    not a pipeline."""
    if is_adapter_output(folder):
        return True
    config = Path(folder) / "config.yaml"
    if (Path(folder) / "model_index.json").is_file() or not config.is_file():
        return False
    try:
        tokens = load_config(config).textual_inversion.placeholder_tokens
    except UserError:  # (a config this version does not read: not a result it can load)
        return False
    return bool(tokens) and all((Path(folder) / embeddings.file_name(token)).is_file() for token in tokens)


def pipeline_class(path: str, revision: str | None = None) -> type:
    """This project's pipeline class, or `StableDiffusionXLPipeline` for an SDXL folder (`text_encoder_2`)."""
    index = DiffusionPipeline.load_config(path, revision=revision)
    return sdxl_pipeline_class() if index.get("text_encoder_2") else TextToImageDDPMPipeline


def load_result(folder: str) -> DiffusionPipeline:
    """The pipeline a run wrote to `folder`; for a LoRA or textual-inversion run, its base (from the run's
    config.yaml) with the adapters and embeddings loaded. An SDXL one is diffusers' own pipeline."""
    if not on_a_base(folder):
        return pipeline_class(folder).from_pretrained(folder, use_safetensors=True)
    config = load_config(Path(folder) / "config.yaml")
    model = config.model
    base = base_folder(model)  # (a single-file base: its conversion)
    cls = pipeline_class(base, model.revision)
    pipeline = cls.from_pretrained(base, revision=model.revision, variant=model.variant,
                                   use_safetensors=True if model.use_safetensors else None)
    if (Path(folder) / LYCORIS_WEIGHTS).is_file():  # LoHa / LoKr: stock diffusers cannot load them
        load_adapters(pipeline, folder, config.lora)
    elif is_adapter_output(folder):
        pipeline.load_lora_weights(folder)
    embeddings.load(pipeline, folder, config.textual_inversion)
    return pipeline
