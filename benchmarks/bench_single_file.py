"""The single-file round trip: a pipeline exported as one `.safetensors` file in the original (LDM) layout
(`finetune.single_file.save`, what `train.export_single_file` writes) and read back by stock diffusers'
`from_single_file`, in each `train.single_file_precision`.

On tiny bases with SD-1.5's and SDXL base 1.0's real block and layer layouts (widths shrunk, as the tests build
them), per precision: the file's size, the largest weight error against the fp32 pipeline (absolute, and relative to
the weight's largest magnitude), and the largest pixel difference of the images both draw (3 Euler/PNDM steps,
guidance 2, two prompts, images in [0, 1]); plus the seconds to export and to load.

    python benchmarks/bench_single_file.py [--json benchmarks/results/single-file.json]
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

from finetune import single_file  # noqa: E402
from finetune.config import ModelConfig  # noqa: E402
from finetune.models import load_components  # noqa: E402
from tests.conftest import build_sd15_shaped, build_tiny_sdxl_pipeline  # noqa: E402


def images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def round_trip(folder: Path, cls, precision: str, scratch: Path) -> dict:
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(folder)))
    start = time.perf_counter()
    path = single_file.save(components, scratch / f"{precision}.safetensors", precision)
    exported = time.perf_counter() - start
    start = time.perf_counter()
    loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True, dtype=torch.float32)
    load_seconds = time.perf_counter() - start
    reference = cls.from_pretrained(folder, use_safetensors=True)
    absolute = relative = 0.0
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(reference, name, None) is None:
            continue
        got = getattr(loaded, name).state_dict()
        for key, want in getattr(reference, name).state_dict().items():
            if want.is_floating_point():
                error = (got[key].float() - want.float()).abs().max().item()
                absolute = max(absolute, error)
                relative = max(relative, error / max(want.abs().max().item(), 1e-12))
    return {"file_bytes": path.stat().st_size, "max_weight_error": absolute, "max_relative_weight_error": relative,
            "max_image_difference": float(np.abs(images(reference) - images(loaded)).max()),
            "export_seconds": round(exported, 3), "load_seconds": round(load_seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}, "bases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        bases = {"sd15-shaped": (build_sd15_shaped(scratch / "sd15"), StableDiffusionPipeline),
                 "sdxl-shaped": (build_tiny_sdxl_pipeline(scratch / "sdxl", real_depths=True),
                                 StableDiffusionXLPipeline)}
        for name, (folder, cls) in bases.items():
            results["bases"][name] = {precision: round_trip(folder, cls, precision, scratch)
                                      for precision in ("fp32", "fp16", "bf16")}
            print(name, json.dumps(results["bases"][name], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
