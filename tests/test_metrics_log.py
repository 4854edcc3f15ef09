"""metrics.jsonl: the step logger's own record of a run, one JSON object a line, which `finetune.ui` reads (so the
web page needs no tracker and no server state)."""

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from finetune.config import TrainConfig
from finetune.progress import METRICS_FILE, StepLogger

from . import launch
from .conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent


def _lines(folder: Path) -> list[dict]:
    text = (folder / METRICS_FILE).read_text()
    assert text.endswith("\n")  # whole lines only
    return [json.loads(line) for line in text.splitlines()]


def test_a_run_appends_start_steps_epoch_counts_and_end(tmp_path):
    """Through the trainer itself: 4 steps over 8 samples (two epochs of two batches), logging every 2 steps."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "finetune" / "train.py"), "--config", str(ROOT / "configs" / "shapes.yaml"),
               *TINY_RUN, "data.num_samples=8", "train.logging_steps=2", "train.max_train_steps=4",
               "train.checkpointing_steps=0", "train.use_ema=false", f"train.output_dir={out}"]
    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = launch.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    lines = _lines(out)
    assert lines[0]["event"] == "start" and lines[0]["step"] == 0 and lines[0]["max_steps"] == 4
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [2, 4]
    for line in steps:
        assert set(line) == {"step", "max_steps", "loss", "lr", "grad_norm", "step_time", "images_per_s", "time"}
        assert line["max_steps"] == 4 and math.isfinite(line["loss"]) and line["images_per_s"] > 0
    data = [line for line in lines if "data" in line]
    assert data and data[0]["data"]["used"] > 0  # an epoch's counts (all epochs so far)
    assert lines[-1]["event"] == "end" and lines[-1]["step"] == 4
    times = [line["time"] for line in lines]
    assert times == sorted(times)


def _logger(tmp_path, main: bool) -> StepLogger:
    accelerator = SimpleNamespace(is_main_process=main, device=torch.device("cpu"), num_processes=1,
                                  log=lambda logs, step: None, reduce=lambda tensor, reduction: tensor)
    return StepLogger(accelerator, TrainConfig(output_dir=str(tmp_path), max_train_steps=3, logging_steps=1), 0)


def test_only_the_main_process_writes_and_non_finite_values_are_null(tmp_path):
    _logger(tmp_path, main=False).record({"step": 1})
    assert not (tmp_path / METRICS_FILE).exists()

    logger = _logger(tmp_path, main=True)
    logger.add(torch.tensor(float("nan")))
    logger.step(1, False, 0.1, torch.tensor(float("inf")))
    start, step = _lines(tmp_path)
    assert start["event"] == "start"
    assert step["loss"] is None and step["grad_norm"] is None and step["lr"] == 0.1  # JSON has no NaN


def test_a_resumed_run_appends_to_the_same_file(tmp_path):
    _logger(tmp_path, main=True).record({"step": 2, "loss": 1.0})
    _logger(tmp_path, main=True)  # resumes: a second start line
    assert [line.get("event") for line in _lines(tmp_path)] == ["start", None, "start"]
