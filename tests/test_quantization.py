"""A quantized base for LoRA (`model.base_quantization`), on the CPU: each mode quantizes the base's linear layers
to its size, the adapters train over them through the trainer, the loss stays near the unquantized run's, a
resume is exact, and the LoRA file is the ordinary one that loads on the full-precision base in stock diffusers."""

import builtins
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from finetune import quantization
from finetune.cli import UserError
from finetune.config import ConfigError, LoraConfig, ModelConfig, load_config
from finetune.lora import attach
from finetune.models import load_components

from .test_finetune import SD
from .test_train import _train

MODES = ["int8", "fp8", "nf4"]


def _linear_bytes(model) -> int:
    return sum(quantization.weight_bytes(m) for m in model.modules() if "Linear" in type(m).__name__
               and not list(m.children()))


@pytest.mark.parametrize(("mode", "ratio"), [("int8", 0.25), ("fp8", 0.25), ("nf4", 0.125)])
def test_each_mode_stores_the_linear_layers_at_its_size(mode, ratio, tiny_sd_folder):
    """Weight bytes of the linear layers: int8 and fp8 a quarter of float32 (plus per-channel scales), nf4 an
    eighth (plus a scale per 64 weights); what the UNet computes stays close to the float32 UNet's."""
    torch.manual_seed(0)
    base = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    quantized = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    before = _linear_bytes(quantized.unet)
    quantization.quantize(quantized.unet, mode, torch.float32, torch.device("cpu"))
    after = _linear_bytes(quantized.unet)
    assert ratio * before <= after <= 1.6 * ratio * before, (before, after)
    sample, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 16)
    with torch.no_grad():
        want, got = base.unet(sample, t, text).sample, quantized.unet(sample, t, text).sample
    assert (got - want).norm() / want.norm() < {"int8": 0.02, "fp8": 0.1, "nf4": 0.3}[mode]


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_adapters_train_over_each_quantized_base(mode, precision, tiny_sd_folder):
    """peft wraps the quantized layers (torchao's with its torchao LoRA layer); every adapter gets a gradient (at
    the start only B's is non-zero: B is zero, so A cannot change the output yet), and the quantized weights stay
    frozen. Under bf16 autocast too, with the float32 inputs the trainer feeds: autocast does not reach the
    quantized layers, which cast their inputs themselves (else their float32 outputs meet the bf16 norms)."""
    components = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_sd_folder)))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    quantization.quantize_base(components, mode, dtype, torch.device("cpu"))
    unet = attach(components, LoraConfig(enabled=True, rank=2), autocast=precision == "bf16")[0]
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 16)).sample
    out.float().pow(2).mean().backward()
    trained = [(name, p) for name, p in unet.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in name for name, _ in trained)
    assert all(p.grad is not None for _, p in trained)
    assert all(p.grad.abs().sum() > 0 for name, p in trained if ".lora_B." in name)


@pytest.mark.slow
def test_a_quantized_lora_run_stays_near_the_full_precision_one_and_loads_on_it(tiny_sd_folder, tmp_path):
    """Through the trainer, 6 steps of the same LoRA job per mode: the logged loss (the mean of steps 1-6)
    within 10% of the float32 base's run; each LoRA file has the same keys as the float32 run's and loads with
    stock diffusers' `load_lora_weights` onto the full-precision base, changing its images."""
    common = [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true", "lora.rank=4",
              "train.max_train_steps=6", "train.logging_steps=6", "train.learning_rate=1e-2", "train.use_ema=false",
              "validation.validation_steps=0"]
    losses, files = {}, {}
    for mode in ["none", *MODES]:
        out = tmp_path / mode
        _train(tmp_path, *common, f"model.base_quantization={mode}", f"train.output_dir={out}")
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = next(line["loss"] for line in lines if line.get("step") == 6 and "loss" in line)
        files[mode] = load_file(out / "pytorch_lora_weights.safetensors")
    for mode in MODES:
        assert abs(losses[mode] - losses["none"]) <= 0.1 * losses["none"], losses
        assert files[mode].keys() == files["none"].keys()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe("a red circle", num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base_images = images()
    for mode in MODES:
        pipe.load_lora_weights(tmp_path / mode, adapter_name=mode)
        pipe.set_adapters(mode)
        assert not np.array_equal(images(), base_images), mode


@pytest.mark.slow
def test_a_run_on_an_nf4_base_resumes_exactly(tiny_sd_folder, tmp_path):
    common = [*SD, f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
              "model.base_quantization=nf4", "train.max_train_steps=4", "train.checkpointing_steps=2",
              "validation.validation_steps=0"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(tmp_path, *common, f"train.output_dir={full}")
    resumed.mkdir()
    (resumed / "checkpoint-2").symlink_to(full / "checkpoint-2")
    _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    a, b = (load_file(folder / "pytorch_lora_weights.safetensors") for folder in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_quantizing_a_base_needs_a_lora_run_and_nf4_a_plain_lora():
    with pytest.raises(ConfigError, match="model.base_quantization: int8 quantizes a frozen base"):
        load_config(None, ["model.pretrained_model_name_or_path=base", "model.base_quantization=int8"])
    with pytest.raises(ConfigError, match="model.base_quantization: nf4 cannot carry lora.type: loha"):
        load_config(None, ["model.pretrained_model_name_or_path=base", "model.base_quantization=nf4",
                           "model.train_text_encoder=false", "lora.enabled=true", "lora.type=loha"])


def test_cpu_offload_refuses_what_it_would_skip():
    """torchao's offloaded optimizer copies the gradients to the CPU during the backward pass: clipping (on by
    default) and fp16's unscaling would never reach what it steps with."""
    with pytest.raises(ConfigError, match="train.optimizer_cpu_offload: .*set train.max_grad_norm: 0"):
        load_config(None, ["train.optimizer_cpu_offload=true"])
    load_config(None, ["train.optimizer_cpu_offload=true", "train.max_grad_norm=0"])


def test_a_missing_package_names_the_extra(monkeypatch, tiny_sd_folder):
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    monkeypatch.setattr(quantization.importlib, "import_module", lambda name: no_torchao(name))
    with pytest.raises(UserError, match=r"int8 needs the torchao package: pip install 'finetune-ddpm\[quantization\]'"):
        quantization.quantize(torch.nn.Linear(2, 2), "int8", torch.float32, torch.device("cpu"))


def test_importing_the_project_never_reaches_the_hub():
    """bitsandbytes >= 0.50 on a CPU with AVX512-BF16 asks the Hub for a CPU kernel when it is imported (which
    diffusers does whenever it is installed); the project's import runs it offline, online settings or not, and
    with none of its import-time chatter. (On a CPU without AVX512-BF16 bitsandbytes asks nothing.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))}
    script = "import logging; logging.basicConfig(level=logging.DEBUG); import finetune.train"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "connect_tcp" not in result.stderr and "huggingface.co" not in result.stderr
    assert "Failed to load" not in result.stderr


def test_nf4_on_the_cpu_needs_bitsandbytes_with_cpu_kernels(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.45.5")
    with pytest.raises(UserError, match=r"nf4 on the CPU needs bitsandbytes >= 0.46 .*this is 0.45.5"):
        quantization.quantize(torch.nn.Linear(64, 64), "nf4", torch.float32, torch.device("cpu"))
