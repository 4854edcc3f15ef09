"""An independent judge of prompt adherence on the digits data (issue 21).

A scikit-learn SVC on the 8x8 ink values (0..16) of the real training scans (the split make_digits.py wrote).
A generated 32 px image is judged the same way: grayscale, 4x4 box-averaged to 8x8, ink = (255 - gray) * 16 / 255,
which gives back the real scans exactly through make_digits' rendering (so held-out accuracy is the accuracy
through the 32 px rendering).

    python benchmarks/conditioning/classify.py PIPELINE_OR_CHECKPOINT [...] --split /tmp/cond/digits/split.json \
        [--n 10] [--guidance 1 3] [--steps 50] [--out result.json]

samples "a handwritten digit <word>" for the 10 digits, N images each (the same noise for every model), at each
guidance scale, and reports adherence = share of images the classifier reads as the prompted digit, with the
histogram of what was read (a model that ignores the text draws the same digits for every prompt).
A checkpoint folder is exported first (python -m finetune.export).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_digits import WORDS, render  # noqa: E402


def to_ink8(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 or [0, 1] floats -> (N, 64) ink values 0..16 (8x8 box average)."""
    x = np.asarray(images, dtype=np.float64)
    if x.max() <= 1.0 + 1e-6:
        x = x * 255
    gray = x.mean(axis=-1) if x.ndim == 4 else x
    n, h, w = gray.shape
    f = h // 8
    small = gray.reshape(n, 8, f, 8, f).mean(axis=(2, 4))
    return ((255 - small) * 16 / 255).reshape(n, 64)


def fit(split_path: str):
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    split = json.loads(Path(split_path).read_text())
    digits = load_digits()
    train, test = np.array(split["train"]), np.array(split["test"])
    clf = SVC(gamma=0.001, C=10).fit(digits.data[train], digits.target[train])
    rendered = np.stack([np.asarray(render(digits.images[i])) for i in test])  # through the 32 px rendering
    acc = float((clf.predict(to_ink8(rendered)) == digits.target[test]).mean())
    return clf, acc


def pipeline_folder(path: str) -> str:
    p = Path(path)
    if (p / "manifest.json").exists():  # a checkpoint: export it (reused when already exported)
        if not (p / "pipeline" / "model_index.json").exists():
            subprocess.run([sys.executable, "-m", "finetune.export", str(p)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return str(p / "pipeline")
    return str(p)


def sample(folder: str, prompts: list[str], n: int, guidance: float, steps: int, seed: int = 0) -> np.ndarray:
    import torch

    from pipelines import TextToImageDDPMPipeline

    pipe = TextToImageDDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe([p for p in prompts for _ in range(n)], num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return np.asarray(out.images)


def adherence(clf, folder: str, n: int = 10, guidance: float = 1.0, steps: int = 50,
              template: str = "a handwritten digit {word}", grid: str | None = None) -> dict:
    prompts = [template.format(word=w, num=i) for i, w in enumerate(WORDS)]
    t0 = time.time()
    images = sample(folder, prompts, n, guidance, steps)
    read = clf.predict(to_ink8(images))
    if grid:  # one row per prompted digit
        from PIL import Image
        rows = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8).reshape(10, n, *images.shape[1:])
        h, w = rows.shape[2:4]
        Image.fromarray(rows.transpose(0, 2, 1, 3, 4).reshape(10 * h, n * w, 3)).save(grid)
    wanted = np.repeat(np.arange(10), n)
    per_class = [float((read[wanted == d] == d).mean()) for d in range(10)]
    return {"guidance": guidance, "n_per_prompt": n, "steps": steps, "template": template,
            "adherence": float((read == wanted).mean()), "per_digit": per_class,
            "read_histogram": np.bincount(read, minlength=10).tolist(), "sample_s": round(time.time() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--split", default="/tmp/cond/digits/split.json")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--template", default="a handwritten digit {word}")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--grid", help="save each sampled grid as GRID-g<guidance>.png (rows: prompted digit)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    clf, acc = fit(args.split)
    print(f"classifier: accuracy {acc:.4f} on held-out real scans through the 32 px rendering")
    results = {"classifier_test_accuracy": acc, "models": {}}
    for model in args.models:
        folder = pipeline_folder(model)
        rows = [adherence(clf, folder, args.n, g, args.steps, args.template,
                          f"{args.grid}-g{g:g}.png" if args.grid else None) for g in args.guidance]
        results["models"][model] = rows
        print(model, "  ".join(f"g={r['guidance']:g}: {r['adherence']:.2f} read {r['read_histogram']}" for r in rows))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
