"""Conditioning strength of a model: how far the caption moves the noise prediction, by timestep band (issue 21).

For a fixed batch of real images x_0 (digits: 3 held-out scans per digit; shapes: 2 fresh built-in renders per
colour x shape), fixed noise and, per band, one fixed t per image drawn uniformly in the band, x_t is formed and
the UNet (EMA weights, as exported) predicts eps for every class prompt and for the empty caption. Reported per band:

  prompt_vs_empty   mean |eps(x_t, t, c_true) - eps(x_t, t, "")|
  between_prompts   mean over prompt pairs c_i != c_j of mean |eps(c_i) - eps(c_j)|
  ratio             between_prompts / prompt_vs_empty (~0: the text is read as "there is a caption", not which)
  pair_max_abs      max |eps("zero") - eps("seven")| on the first image (the issue's single-input number)
  x0_*              the same two gaps in the predicted x_0 (times sqrt((1 - alpha_bar_t) / alpha_bar_t)): what
                    the sampler acts on; at high t a small eps gap is a large x_0 gap
  diffusion_classifier  share of images whose lowest-error prompt (||eps(c) - eps_true||^2) is the true one:
                    does the conditional model know the class at that noise level (chance 0.1 digits, 1/15 shapes)

    python benchmarks/conditioning/strength.py MODEL [MODEL ...] [--data digits|shapes] [--out result.json]

MODEL is a pipeline folder or a checkpoint (exported first with python -m finetune.export).
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classify import pipeline_folder  # noqa: E402
from make_digits import WORDS, render  # noqa: E402

BANDS = [(0, 250), (250, 500), (500, 750), (750, 1000)]


def digits_batch(split_path: str, per_class: int = 3):
    from sklearn.datasets import load_digits

    test = json.loads(Path(split_path).read_text())["test"]
    digits = load_digits()
    chosen = [[i for i in test if digits.target[i] == d][:per_class] for d in range(10)]
    idx = [i for group in chosen for i in group]
    images = np.stack([np.asarray(render(digits.images[i])) for i in idx])
    labels = np.array([digits.target[i] for i in idx])
    prompts = [f"a handwritten digit {w}" for w in WORDS]
    return images, labels, prompts, (0, 7)


def shapes_batch(per_class: int = 2):
    import io

    from PIL import Image

    from finetune.data import shapes

    combos = [(c, s) for c in shapes.DEFAULT_COLORS for s in shapes.SHAPES]
    prompts = [shapes.caption_for(c, s, "a {color} {shape}") for c, s in combos]
    images, labels, index = [], [], 0
    counts = {k: 0 for k in combos}
    while min(counts.values()) < per_class:  # fresh renders (seed 12345, not the training seed)
        png, _, meta = shapes.render_sample(index, 12345)
        index += 1
        key = (meta["color"], meta["shape"])
        if meta["pwatermark"] > 0.5 or counts[key] >= per_class:
            continue
        counts[key] += 1
        images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)))
        labels.append(combos.index(key))
    return np.stack(images), np.array(labels), prompts, (0, 4)  # red circle vs blue square... indices 0, 4


def as_eps(out: torch.Tensor, xt: torch.Tensor, ab: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The model's output as an eps prediction, whatever it predicts (so models of any type compare)."""
    if prediction_type == "sample":
        return (xt - ab.sqrt() * out) / (1 - ab).sqrt()
    if prediction_type == "v_prediction":
        return ab.sqrt() * out + (1 - ab).sqrt() * xt
    return out


@torch.no_grad()
def strength(folder: str, images: np.ndarray, labels: np.ndarray, prompts: list[str], pair: tuple[int, int],
             seed: int = 0) -> dict:
    from pipelines import TextToImageDDPMPipeline

    pipe = TextToImageDDPMPipeline.from_pretrained(folder)
    unet, scheduler = pipe.unet.eval(), pipe.scheduler
    texts = pipe.encode_prompt(prompts + [""], torch.device("cpu"))  # (P+1, L, D)
    x0 = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    n, p = len(x0), len(prompts)
    result = {}
    for lo, hi in BANDS:
        t = torch.randint(lo, hi, (n,), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        out = torch.stack([unet(xt, t, encoder_hidden_states=texts[k:k + 1].expand(n, -1, -1)).sample
                           for k in range(p + 1)])  # (P+1, N, C, H, W)
        eps = as_eps(out, xt, scheduler.alphas_cumprod[t].view(n, 1, 1, 1), scheduler.config.prediction_type)
        empty = eps[p]
        true = eps[torch.from_numpy(labels), torch.arange(n)]
        vs_empty = (true - empty).abs().mean().item()
        pairs = [(eps[i] - eps[j]).abs().mean().item() for i, j in itertools.combinations(range(p), 2)]
        err = ((eps[:p] - noise).pow(2)).mean(dim=(2, 3, 4))  # (P, N)
        ab = scheduler.alphas_cumprod[t].view(n, 1, 1, 1)
        to_x0 = ((1 - ab) / ab).sqrt()  # |d x0_hat| = sqrt((1 - ab) / ab) |d eps_hat|
        x0_gap = ((true - empty).abs() * to_x0).mean().item()
        result[f"{lo}-{hi}"] = {
            "prompt_vs_empty": vs_empty,
            "between_prompts": float(np.mean(pairs)),
            "ratio": float(np.mean(pairs)) / vs_empty if vs_empty else float("nan"),
            "pair_max_abs": (eps[pair[0], 0] - eps[pair[1], 0]).abs().max().item(),
            "empty_max_abs": (eps[pair[0], 0] - empty[0]).abs().max().item(),
            "x0_prompt_vs_empty": x0_gap,
            "x0_between_prompts": float(np.mean([((eps[i] - eps[j]).abs() * to_x0).mean().item()
                                                 for i, j in itertools.combinations(range(p), 2)])),
            "diffusion_classifier": float((err.argmin(0).numpy() == labels).mean()),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", choices=["digits", "shapes"], default="digits")
    parser.add_argument("--split", default="/tmp/cond/digits/split.json")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = digits_batch(args.split) if args.data == "digits" else shapes_batch()
    results = {}
    for model in args.models:
        results[model] = strength(pipeline_folder(model), *batch)
        print(model)
        for band, r in results[model].items():
            print(f"  t {band:>8}: vs_empty {r['prompt_vs_empty']:.4f}  between {r['between_prompts']:.4f}  "
                  f"ratio {r['ratio']:.2f}  pair_max {r['pair_max_abs']:.3f} (empty {r['empty_max_abs']:.3f})  "
                  f"x0: vs_empty {r['x0_prompt_vs_empty']:.3f} between {r['x0_between_prompts']:.3f}  "
                  f"diff-clf {r['diffusion_classifier']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
