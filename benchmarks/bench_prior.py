"""DreamBooth's class images: how long one process takes to draw them, and what a rerun costs (it finds them).

The SD-1.5-shaped base of the tests (`tests/conftest.py build_sd15_shaped`: SD-1.5's configs, widths shrunk) draws
`--count` class images at 64 px with 25 sampler steps, `sample_batch_size` 4, in one process (as each process of a
run draws its share, i % processes, this is the per-process rate), then the same call again. Reported: seconds,
images/s, and the rerun's seconds (it only checks that the files are there).

    python benchmarks/bench_prior.py [--count 16] [--json benchmarks/results/prior.json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.config import ModelConfig, PriorConfig  # noqa: E402
from finetune.models import load_components  # noqa: E402
from finetune.prior import draw_class_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tests.conftest import build_sd15_shaped

    with tempfile.TemporaryDirectory() as tmp:
        base = build_sd15_shaped(Path(tmp) / "base")
        components = load_components(ModelConfig(pretrained_model_name_or_path=str(base)))
        prior = PriorConfig(mode="class_images", class_prompt="a photo of a dog", num_class_images=args.count,
                            num_inference_steps=25, sample_batch_size=4, class_data_dir=str(Path(tmp) / "class"))
        start = time.perf_counter()
        _, drawn = draw_class_images(prior, components, 64, 0, 1)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        _, again = draw_class_images(prior, components, 64, 0, 1)
        rerun = time.perf_counter() - start
    result = {"machine": f"2-core x86_64 CPU, {torch.get_num_threads()} threads, fp32",
              "base": "SD-1.5-shaped, widths shrunk (tests/conftest.py build_sd15_shaped)", "resolution": 64,
              "num_inference_steps": 25, "sample_batch_size": 4, "drawn": drawn, "seconds": round(seconds, 2),
              "images_per_s": round(drawn / seconds, 2), "rerun_drawn": again, "rerun_seconds": round(rerun, 3)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
