"""Sharded training with accelerate's FSDP2, for real on the CPU: two gloo processes under `accelerate launch
--config_file configs/accelerate/fsdp.yaml --num_processes 2` (the shipped config), with FINETUNE_TEST_FSDP_ON_CPU
(tests/faults/sitecustomize.py: accelerate keeps FSDP for accelerator devices; that lifts that one check, and
accelerate's own FSDP2 code then runs). Against the DDP run of the same config, a killed and resumed sharded run,
the exports loaded downstream; and the refusals."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType, DynamoBackend
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from finetune import checkpointing, sharding
from finetune.cli import UserError
from finetune.config import ModelConfig, TrainConfig
from pipelines import TextToImageDDPMPipeline

from . import launch
from .test_finetune import SD, _grid, _regrid
from .test_train import ROOT, _command, _env, _train

FSDP_ON_CPU = {"ACCELERATE_USE_CPU": "1", "FINETUNE_TEST_FSDP_ON_CPU": "1"}
# Enough samples for 2 processes' shards; the text encoder frozen: accelerate's FSDP2 shards one trained model.
COMMON = ["data.num_samples=2000", "model.train_text_encoder=false", "train.use_ema=true"]


def _launcher(fsdp: bool) -> tuple:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = ("--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")) if fsdp else ("--multi_gpu",)
    return (sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port))


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.mark.slow
def test_a_sharded_full_fine_tune_matches_ddp_resumes_exactly_and_loads(tmp_path):
    """The from-scratch model's UNet sharded over 2 processes, 24 steps of 2 accumulated micro-batches with EMA, a
    checkpoint and a validation grid (gathered whole on the main process, then emptied) every 8: its loss
    curve is the DDP run's (same data, same noise: FSDP reduce-scatters the same 2-term gradient mean, and only the
    clipping norm is summed in another order), its weights within 1e-4; SIGKILL after a checkpoint and `latest`
    end with the same bytes; the checkpoints are shards in safetensors (no pickle), exported offline to the same
    weights as the run's own export, which loads downstream."""
    steps = ["train.max_train_steps=24", "train.checkpointing_steps=8", "validation.validation_steps=8",
             "train.gradient_accumulation_steps=2"]
    env = {"ACCELERATE_USE_CPU": "1"}
    fsdp, ddp, killed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "killed"
    result = _train(tmp_path, *COMMON, *steps, f"train.output_dir={fsdp}", launcher=_launcher(True), env=FSDP_ON_CPU)
    assert "on cpu:0 (FSDP)" in result.stdout and "weights sharded (FSDP)" in result.stderr
    _train(tmp_path, *COMMON, *steps, f"train.output_dir={ddp}", launcher=_launcher(False), env=env)

    np.testing.assert_allclose(_losses(fsdp), _losses(ddp), rtol=1e-5)
    sharded = load_file(fsdp / "unet" / "diffusion_pytorch_model.safetensors")
    whole = load_file(ddp / "unet" / "diffusion_pytorch_model.safetensors")
    assert sharded.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(sharded[key], whole[key], rtol=1e-4, atol=1e-4, msg=key)

    checkpoint = fsdp / "checkpoint-24"
    manifest = checkpointing.read_manifest(checkpoint, world_size=2, sharded=True)
    assert manifest["sharded"] and {"shard-0.model_0.safetensors", "shard-1.optimizer.safetensors",
                                    "shard-1.ema_0.safetensors", "scheduler.json"} <= set(manifest["files"])
    assert not [p for p in checkpoint.iterdir() if p.suffix in (".pkl", ".bin", ".pt", ".distcp", ".metadata")]
    with pytest.raises(UserError, match="written sharded \\(FSDP\\) but this run is not"):
        checkpointing.read_manifest(checkpoint, world_size=2, sharded=False)

    # Killed between checkpoints (the whole process group, as a node loss would), then resumed from `latest`.
    process = subprocess.Popen(_command(_launcher(True), [*COMMON, *steps, f"train.output_dir={killed}"]),
                               cwd=tmp_path, env=_env(tmp_path, FSDP_ON_CPU), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    while not (killed / "checkpoint-8").is_dir() and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (killed / "model_index.json").exists()
    result = _train(tmp_path, *COMMON, *steps, f"train.output_dir={killed}", "train.resume_from_checkpoint=latest",
                    launcher=_launcher(True), env=FSDP_ON_CPU)
    assert "resumed from" in result.stderr and "settings changed" not in result.stderr
    for name in ("checkpoint-24/shard-0.model_0.safetensors", "checkpoint-24/shard-1.model_0.safetensors",
                 "checkpoint-24/shard-1.optimizer.safetensors", "checkpoint-24/shard-0.ema_0.safetensors",
                 "unet/diffusion_pytorch_model.safetensors"):
        assert (fsdp / name).read_bytes() == (killed / name).read_bytes(), name

    # The sharded checkpoint, stitched offline by `python -m finetune.export`, is the run's own (EMA) export.
    export = launch.run([sys.executable, "-m", "finetune.export", str(checkpoint)], cwd=ROOT,
                        env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    offline = load_file(checkpoint / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    for key in sharded:
        assert torch.equal(offline[key], sharded[key]), key
    pipe = TextToImageDDPMPipeline.from_pretrained(fsdp)
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(pipe("a red circle", num_inference_steps=2, output_type="np").images).all()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_sharded_lora_run_writes_the_same_file_and_loads_in_stock_diffusers(tiny_sd_folder, tmp_path, precision):
    """LoRA on an SD-1.5-shaped base under FSDP2 (frozen base and adapters in the same shards) with gradient
    checkpointing: the LoRA file has exactly the keys of a one-process run's and stock `load_lora_weights` loads
    it; in fp32 the stock pipeline draws the sharded run's final grid exactly (gathered whole on the main process;
    under bf16 the run samples in autocast, the stock pipeline in fp32); its sharded checkpoint exported offline is
    the same LoRA file."""
    common = [*SD, "validation.guidance_scale=2.0", f"model.pretrained_model_name_or_path={tiny_sd_folder}",
              "lora.enabled=true", "lora.alpha=8", "data.num_samples=64", "data.resampled=true",
              "train.max_train_steps=4", "train.gradient_checkpointing=true", f"train.mixed_precision={precision}",
              "train.cpu_threads=1", "train.checkpointing_steps=4"]  # threads: CPU kernels split sums by thread
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    _train(tmp_path, *common, f"train.output_dir={sharded}", launcher=_launcher(True), env=FSDP_ON_CPU)
    _train(tmp_path, *common, f"train.output_dir={single}")
    keys = load_file(sharded / "pytorch_lora_weights.safetensors").keys()
    assert keys == load_file(single / "pytorch_lora_weights.safetensors").keys() and keys

    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run sampled (train.cpu_threads)
    try:
        before = _regrid(stock, sharded)
        stock.load_lora_weights(sharded)
        after = _regrid(stock, sharded)
    finally:
        torch.set_num_threads(threads)
    assert not np.array_equal(before, after)
    if precision == "no":
        assert np.array_equal(after, _grid(sharded, 4))

    # The sharded adapters' checkpoint, stitched offline, is the run's own LoRA file.
    export = launch.run([sys.executable, "-m", "finetune.export", str(sharded / "checkpoint-4")], cwd=ROOT,
                        env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    offline = load_file(sharded / "checkpoint-4" / "pipeline" / "pytorch_lora_weights.safetensors")
    final = load_file(sharded / "pytorch_lora_weights.safetensors")
    assert offline.keys() == final.keys() and all(torch.equal(offline[k], final[k]) for k in final)


def _fsdp(version=2, mixed_precision="no", dynamo=DynamoBackend.NO, activation_checkpointing=False):
    plugin = SimpleNamespace(fsdp_version=version, activation_checkpointing=activation_checkpointing)
    return SimpleNamespace(distributed_type=DistributedType.FSDP, mixed_precision=mixed_precision,
                           state=SimpleNamespace(fsdp_plugin=plugin, dynamo_plugin=SimpleNamespace(backend=dynamo)))


@pytest.mark.parametrize(("train", "model", "lora_text_encoder", "accelerator", "message"), [
    ({}, {}, False, _fsdp(version=1), "FSDP version 1; this trainer shards with FSDP2: set fsdp_version: 2"),
    ({}, {"train_text_encoder": True}, False, _fsdp(), "model.train_text_encoder=true \\(accelerate shards one"),
    ({}, {"train_text_encoder": False}, True, _fsdp(), "lora.train_text_encoder=true"),
    ({"optimizer": "prodigy"}, {}, False, _fsdp(), "train.optimizer=prodigy \\(sharded checkpoints hold adamw or sgd"),
    ({"mixed_precision": "auto"}, {}, False, _fsdp(mixed_precision="fp16"),
     "train.mixed_precision=auto, which is fp16 here \\(use bf16, or no\\)"),
    ({"use_8bit_adam": True}, {}, False, _fsdp(), "train.use_8bit_adam=true"),
    ({"compile": True}, {}, False, _fsdp(), "train.compile or the accelerate config's dynamo_backend"),
    ({}, {}, False, _fsdp(dynamo=DynamoBackend.INDUCTOR), "dynamo_backend \\(compiling a sharded UNet"),
    ({}, {}, False, _fsdp(activation_checkpointing=True), "fsdp_activation_checkpointing \\(its wrappers rename"),
    ({"optimizer_cpu_offload": True, "max_grad_norm": 0}, {}, False, _fsdp(), "fsdp_offload_params instead"),
])
def test_what_the_sharded_path_does_not_do_is_refused(train, model, lora_text_encoder, accelerator, message):
    train, model = TrainConfig(**train), ModelConfig(**{"train_text_encoder": False, **model})
    with pytest.raises(UserError, match=message):
        sharding.check(accelerator, train, model, lora_text_encoder)
    sharding.check(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), train, model, lora_text_encoder)


def test_stitch_rebuilds_torch_chunk_shards(tmp_path):
    """FSDP2 shards along the first dimension as torch.chunk does (the last shard shorter, or empty); `stitch`
    concatenates them in rank order and checks the whole shape; a missing rank is named."""
    whole = {"a": torch.randn(5, 3), "b": torch.randn(1), "c": torch.randn(4)}
    for rank in range(3):
        pieces = {k: (torch.chunk(v, 3)[rank] if rank < len(torch.chunk(v, 3)) else v[:0]).clone()
                  for k, v in whole.items()}
        sharding._write(tmp_path, rank, "model_0", pieces, {"whole": whole})
    stitched = sharding.stitch(tmp_path, "model_0")
    assert stitched.keys() == whole.keys() and all(torch.equal(stitched[k], whole[k]) for k in whole)
    (tmp_path / sharding.SHARD.format(rank=1, part="model_0")).unlink()
    with pytest.raises(UserError, match="incomplete \\(ranks \\[0, 2\\]\\)"):
        sharding.stitch(tmp_path, "model_0")


@pytest.mark.slow
def test_fsdp_that_accelerate_leaves_unsharded_is_refused(tmp_path):
    """The FSDP config on a CPU as accelerate has it: it sets the processes up as plain DDP (MULTI_CPU), which would
    train unsharded while the config says FSDP; the trainer refuses, saying what to use."""
    result = _train(tmp_path, *COMMON, "--dry-run", f"train.output_dir={tmp_path / 'o'}", launcher=_launcher(True),
                    env={"ACCELERATE_USE_CPU": "1"}, check=False)
    assert result.returncode != 0
    assert "error: the accelerate config asks for FSDP but accelerate set this run up as MULTI_CPU, unsharded" \
        in result.stderr


def test_deepspeed_is_refused(monkeypatch):
    """DeepSpeed (its checkpoints are pickles it loads unrestricted) is refused with the way to shard instead."""
    from finetune import distributed
    from finetune.config import Config

    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2)
    monkeypatch.setattr(distributed, "Accelerator", lambda **kwargs: deepspeed)
    with pytest.raises(UserError, match="asks for DeepSpeed, which this trainer does not run: its checkpoints are "
                                        "pickles.*configs/accelerate/fsdp.yaml"):
        distributed.make_accelerator(Config())
