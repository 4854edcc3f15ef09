"""The trainer's own text-use figure (finetune.conditioning, logged at each validation) on finished runs: the gaps
at the three points of the reverse process and the ratio between_prompts / prompt_vs_empty, which sets the
trainer's warning threshold (conditioning.IGNORED_RATIO).

    python benchmarks/conditioning/validation_gaps.py --out results/validation_gaps.json \
        digits-baseline=/tmp/cond/runs/base:digits digits-recipe=/tmp/cond/runs/x0uni:digits \
        shapes-default=outputs/shapes:shapes
"""

import argparse
import json

import torch

from finetune.config import ValidationConfig
from finetune.validation import sample_grid
from pipelines import TextToImageDDPMPipeline

PROMPTS = {"digits": [f"a handwritten digit {w}" for w in "zero one two three four five six seven eight nine".split()],
           "shapes": ["a red circle", "an orange square", "a yellow triangle", "a green circle", "a blue square"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="name=folder:prompts (prompts: digits or shapes)")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for run in args.runs:
        name, _, rest = run.partition("=")
        folder, _, prompts = rest.rpartition(":")
        pipe = TextToImageDDPMPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        gaps = {}
        sample_grid(pipe, ValidationConfig(prompts=PROMPTS[prompts], num_images_per_prompt=4, num_inference_steps=50,
                                           guidance_scale=2.0), gaps)
        ratios = {band: gaps[f"conditioning/between_prompts_{band}"] / gaps[f"conditioning/prompt_vs_empty_{band}"]
                  for band in ("start", "middle", "end")}
        results[name] = {"folder": folder, "gaps": gaps, "ratios": ratios}
        print(name, {k: round(v, 2) for k, v in ratios.items()}, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
