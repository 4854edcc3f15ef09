"""Prompt adherence on any class-captioned dataset (`python -m finetune.evaluate RUN --metrics classes`): images
are generated from "<template> <class>" prompts and an independent judge says which class each shows.

The judge is a model the user supplies (`--classifier`: a local transformers image-classification folder in
safetensors whose labels name the classes), or one fitted here on the run's own training images, labelled by the
class word their caption holds: a scikit-learn logistic regression on the images shrunk to 8x8 RGB, which is
enough for small class-like sets (icons, sprites, digits). Its accuracy on a fifth of those images, left out of
the fit, is reported beside the adherence: a judge that cannot tell the real images apart cannot judge the
generated ones either.

A class is `name` or `name:alias,alias` (`seven:7`): a caption holds a class when one of its words is the name or
an alias; captions naming no class, or two, are left out of the fit and counted.
"""

import re
from collections import Counter

import numpy as np
import torch
from PIL import Image

from .cli import UserError

SIZE = 8  # the judge's view: images shrunk to SIZE x SIZE RGB
HELD_OUT_EVERY = 5  # every fifth labelled image is left out of the fit, to measure the judge


def parse_classes(specs: list[str]) -> dict[str, list[str]]:
    """{class: the words that name it} from `name` or `name:alias,alias` specs."""
    classes = {}
    for spec in specs:
        name, _, aliases = spec.partition(":")
        words = [w.strip().lower() for w in [name, *aliases.split(",")] if w.strip()]
        if not words or name.strip().lower() in classes:
            raise UserError(f"--classes {spec!r}: give each class once, as name or name:alias,alias (e.g. seven:7)")
        classes[name.strip().lower()] = words
    if len(classes) < 2:
        raise UserError("--classes: name at least two classes (adherence means telling them apart)")
    return classes


def caption_class(caption: str, classes: dict[str, list[str]]) -> str | None:
    """The one class whose name or alias is a word of `caption`, or None (none, or several)."""
    words = set(re.findall(r"\w+", caption.lower()))
    found = [name for name, names in classes.items() if words & set(names)]
    return found[0] if len(found) == 1 else None


def features(images: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 images (H, W, 3) shrunk to SIZE x SIZE, as rows of floats in [0, 1]."""
    return np.stack([np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BOX), dtype=np.float32).ravel()
                     / 255 for image in images])


class FittedJudge:
    """A logistic regression on `features`, fitted on labelled training images (all but every fifth)."""

    def __init__(self, images: list[np.ndarray], labels: list[str]):
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError as error:
            raise UserError("--metrics classes fits its judge with scikit-learn, which is not installed: pip install "
                            "scikit-learn (or pip install -e '.[classes]'), or give --classifier") from error
        held_out = np.arange(len(images)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        x, y = features(images), np.array(labels)
        if len(set(y[~held_out])) < 2 or not held_out.any():
            raise UserError(f"--metrics classes: {len(images)} labelled training images over {len(set(labels))} "
                            "class(es) are too few to fit a judge; raise --max-samples or check --classes")
        self.model = LogisticRegression(max_iter=2000).fit(x[~held_out], y[~held_out])
        self.accuracy = float((self.model.predict(x[held_out]) == y[held_out]).mean())
        self.description = (f"logistic regression on {SIZE}x{SIZE} RGB, fitted on {int((~held_out).sum())} training "
                            f"images, {self.accuracy:.1%} right on {int(held_out.sum())} left out")

    def predict(self, images: list[np.ndarray]) -> list[str]:
        return [str(label) for label in self.model.predict(features(images))]


class SuppliedJudge:
    """A transformers image classifier from a local folder (safetensors), its labels mapped to the classes."""

    def __init__(self, path: str, classes: dict[str, list[str]], device: str):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            self.model = AutoModelForImageClassification.from_pretrained(path, use_safetensors=True).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(path)
        except OSError as error:
            raise UserError(f"--classifier {path}: not a local image-classification model in safetensors "
                            f"({error})") from error
        labels = {i: str(label).lower() for i, label in self.model.config.id2label.items()}
        self.to_class = {i: caption_class(label, classes) for i, label in labels.items()}
        missing = [name for name in classes if name not in self.to_class.values()]
        if missing:
            raise UserError(f"--classifier {path}: none of its labels names {', '.join(missing)} (its labels: "
                            f"{', '.join(sorted(labels.values()))})")
        self.accuracy, self.description = None, f"{type(self.model).__name__} from {path}"

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> list[str | None]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.model.device)
        return [self.to_class[int(i)] for i in self.model(**inputs).logits.argmax(-1)]


def labelled(pairs: list[dict], classes: dict[str, list[str]], to_rgb) -> tuple[list, list, Counter]:
    """The images and class labels of the pairs whose caption names one class, and the counts of the others."""
    images, labels, left_out = [], [], Counter()
    for pair in pairs:
        label = caption_class(pair["caption"], classes)
        if label is None:
            left_out["caption names no class, or several"] += 1
            continue
        images.append(to_rgb(pair["pixels"]))
        labels.append(label)
    return images, labels, left_out


def adherence(judge, images: list[np.ndarray], prompted: list[str]) -> dict:
    """The share of images the judge assigns to their prompt's class, overall and by class."""
    said = judge.predict(images)
    right = [s == p for s, p in zip(said, prompted)]
    by_class = {name: float(np.mean([r for r, p in zip(right, prompted) if p == name]))
                for name in dict.fromkeys(prompted)}
    return {"adherence": float(np.mean(right)), "by_class": by_class, "judged": Counter(map(str, said))}
