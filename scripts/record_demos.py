"""Write docs/results/demos.json from what scripts/measure_demos.sh measured: per run, the command, its training
and evaluation wall times, the adherence metrics, the adapter size, and the machine and versions it ran on."""

import argparse
import json
import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

import yaml


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "diffusers", "transformers", "accelerate", "peft")}}


def adherence(report_path: str) -> dict:
    metrics = json.loads(Path(report_path).read_text())  # finetune.evaluate --json: adherence at the top level
    keep = ("color_accuracy", "color_accuracy_by_color", "shape_accuracy", "num_images", "num_inference_steps",
            "guidance_scale")
    return {key: metrics[key] for key in keep}


def run(folder: str, report: str, start: str, trained: str, evaluated: str) -> dict:
    train = yaml.safe_load((Path(folder) / "config.yaml").read_text())["train"]
    out = {"max_train_steps": train["max_train_steps"], "train_batch_size": train["train_batch_size"],
           "train_seconds": round(float(trained) - float(start), 1),
           "evaluate_seconds": round(float(evaluated) - float(trained), 1), "adherence": adherence(report)}
    lora = Path(folder) / "pytorch_lora_weights.safetensors"
    if lora.is_file():
        out["adapter_bytes"] = lora.stat().st_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--default", nargs=5, required=True, metavar=("FOLDER", "REPORT", "T0", "T1", "T2"))
    parser.add_argument("--lora", nargs=5, required=True, metavar=("FOLDER", "REPORT", "T0", "T1", "T2"))
    parser.add_argument("--lora-base", required=True, metavar="REPORT")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"written_by": "scripts/measure_demos.sh", "commit": commit, "machine": machine(),
              "default": run(*args.default), "lora": {**run(*args.lora), "base_six_colours": adherence(args.lora_base)}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
