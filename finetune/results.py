"""A finished run's output folder, read back: the pipeline it wrote (or its LoRA on the base), whether a folder
is one, and the settings it sampled with. Shared by the sample, evaluate and visualise commands."""

from pathlib import Path

from pipelines import TextToImageDDPMPipeline

from .config import load_config
from .lora import WEIGHT_NAME as LORA_WEIGHTS


def run_guidance_scale(folder: str) -> float:
    """The guidance the run sampled its validation grids with (its saved config), or 1 without one."""
    path = Path(folder) / "config.yaml"
    return load_config(path).validation.guidance_scale if path.is_file() else 1.0


def check_folder(folder: Path) -> str | None:
    """Why `folder` cannot be sampled from, or None."""
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if (folder / LORA_WEIGHTS).is_file():
        if not (folder / "config.yaml").is_file():
            return (f"{folder} holds LoRA weights but no config.yaml naming their base; pass the base pipeline "
                    f"folder and --lora {folder}")
        return None
    if not (folder / "model_index.json").is_file():
        return (f"{folder} is neither a pipeline (no model_index.json) nor a LoRA output (no {LORA_WEIGHTS}); "
                "pass the train.output_dir of a finished run")
    return None


def load_result(folder: str) -> TextToImageDDPMPipeline:
    """The pipeline a run wrote to `folder`; for a LoRA run, its base (from the run's config.yaml) with the
    adapters loaded."""
    if not (Path(folder) / LORA_WEIGHTS).is_file():
        return TextToImageDDPMPipeline.from_pretrained(folder, use_safetensors=True)
    model = load_config(Path(folder) / "config.yaml").model
    pipeline = TextToImageDDPMPipeline.from_pretrained(model.pretrained_model_name_or_path, revision=model.revision,
                                                       variant=model.variant,
                                                       use_safetensors=True if model.use_safetensors else None)
    pipeline.load_lora_weights(folder)
    return pipeline
