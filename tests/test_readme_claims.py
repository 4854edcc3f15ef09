"""The README's headline numbers, and the demo time its scripts and config quote, come from
docs/results/demos.json, which scripts/measure_demos.sh wrote on the run that measured them; and the default config
still reaches the demo's accuracy (slow: the whole default run, about a quarter of an hour on two CPU cores)."""

import json
import sys

import pytest

from . import launch
from .test_train import ROOT, TRAIN, _env

RESULTS = json.loads((ROOT / "docs" / "results" / "demos.json").read_text())


def percent(share: float) -> str:
    return f"{100 * share:.1f}".removesuffix(".0") + "%"


def minutes(seconds: float) -> str:
    whole, rest = divmod(round(seconds), 60)
    return f"{whole}:{rest:02d}"


def demo_minutes() -> str:
    """The demo's time as scripts/demo.sh, the README and configs/shapes.yaml give it: training plus evaluation."""
    default = RESULTS["default"]
    return f"about {round((default['train_seconds'] + default['evaluate_seconds']) / 60)} minutes on two CPU cores"


def readme_claims() -> list[str]:
    default, lora = RESULTS["default"], RESULTS["lora"]
    base, tuned = lora["base_six_colours"], lora["adherence"]
    old = [c for c in tuned["color_accuracy_by_color"] if c != "purple"]
    mean = lambda report: sum(report["color_accuracy_by_color"][c] for c in old) / len(old)  # noqa: E731
    return [
        f"{default['max_train_steps']} steps at batch {default['train_batch_size']} in "
        f"{minutes(default['train_seconds'])} of training, then {minutes(default['evaluate_seconds'])} of evaluation",
        f"colour right for {percent(default['adherence']['color_accuracy'])} of images and shape right for "
        f"{percent(default['adherence']['shape_accuracy'])}",
        f"purple colour right for {percent(base['color_accuracy_by_color']['purple'])} of the base's images and "
        f"{percent(tuned['color_accuracy_by_color']['purple'])} with the LoRA",
        f"the other five colours {percent(mean(base))} for the base and {percent(mean(tuned))} with it",
        f"{lora['max_train_steps']} steps at batch {lora['train_batch_size']} in {minutes(lora['train_seconds'])} of "
        "training",
        f"a {round(lora['adapter_bytes'] / 1024)} KiB adapter file",
    ]


def test_the_readme_quotes_the_measured_results():
    readme = " ".join((ROOT / "README.md").read_text().split())  # sentences run over line breaks
    for claim in readme_claims():
        assert claim in readme, claim
    assert RESULTS["written_by"] == "scripts/measure_demos.sh"


def test_one_demo_time_everywhere():
    for path in ("README.md", "scripts/demo.sh", "configs/shapes.yaml"):
        text = " ".join((ROOT / path).read_text().replace("#", " ").split())
        assert demo_minutes() in text, path


@pytest.mark.slow
def test_the_default_config_still_follows_prompts(tmp_path):
    """configs/shapes.yaml unchanged, then `python -m finetune.evaluate` as scripts/demo.sh runs them."""
    out, env = tmp_path / "shapes", _env(tmp_path)
    launch.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "shapes.yaml"),
                f"train.output_dir={out}"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=3600)
    launch.run([sys.executable, "-m", "finetune.evaluate", str(out), "--json", str(tmp_path / "report.json")],
               cwd=ROOT, env=env, check=True, capture_output=True, timeout=1200)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["color_accuracy"] >= 0.95 and report["shape_accuracy"] >= 0.90, report["metrics"]
