"""The end-of-run check that every process holds the same trained weights: every trained tensor of every model,
hashed, the first that differs named; with a stand-in for a second process, and once through `accelerate launch`."""

import copy
import logging
import subprocess

import pytest
import torch
from accelerate import PartialState

from finetune import lora
from finetune.config import LoraConfig
from finetune.distributed import check_in_sync, weight_digests

from .test_train import ROOT, _env, _two_process_launcher


class TwoProcesses:
    """An accelerator of 2 processes whose process 1 holds `others` (the same models, maybe changed): `gather` puts
    the digests process 1 would send after this process's own."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, others: list[torch.nn.Module]):
        self.others = others

    def unwrap_model(self, model, keep_torch_compile=True):
        return model

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, weight_digests(self.others)[1]])


def _old_checksum(model) -> float:
    """What the check summed before: all UNet parameters into one double."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().item()


def _models(components):
    return [components.unet, components.text_encoder]


def test_identical_weights_pass(tiny_components, caplog):
    PartialState()  # accelerate's logger needs it
    models = _models(tiny_components)
    count = sum(1 for model in models for _ in model.parameters())
    with caplog.at_level(logging.INFO, logger="finetune"):
        check_in_sync(TwoProcesses(copy.deepcopy(models)), models)
    assert f"weights identical on all 2 processes ({count} trained tensors" in caplog.text


def test_two_swapped_elements_in_the_unet_are_named(tiny_components):
    models = _models(tiny_components)
    others = copy.deepcopy(models)
    weight = others[0].conv_in.weight.data
    weight[0, 0, 0, 0], weight[0, 0, 0, 1] = weight[0, 0, 0, 1].clone(), weight[0, 0, 0, 0].clone()
    assert not torch.equal(weight, models[0].conv_in.weight)
    assert _old_checksum(others[0]) == _old_checksum(models[0])  # the old sum could not see a swap
    with pytest.raises(RuntimeError, match=r"UNet2DConditionModel\.conv_in\.weight on process\(es\) \[1\] differs"):
        check_in_sync(TwoProcesses(others), models)


def test_one_element_of_the_text_encoder_is_named(tiny_components):
    """One bit of one weight of the text encoder (which the old check never looked at), late in the order."""
    models = _models(tiny_components)
    others = copy.deepcopy(models)
    name, weight = list(others[1].named_parameters())[-1]
    weight.data.view(-1)[3] = torch.nextafter(weight.data.view(-1)[3], torch.tensor(1.0))
    with pytest.raises(RuntimeError, match=rf"CLIPTextModel\.{name} on process\(es\) \[1\] differs"):
        check_in_sync(TwoProcesses(others), models)


def test_lora_adapters_are_compared_and_the_frozen_base_is_not(tiny_components):
    """With LoRA the trained tensors are the adapters (UNet and text encoder): one of them differing is named; the
    frozen base is not trained, so it is not hashed."""
    trained = lora.attach(tiny_components, LoraConfig(enabled=True, train_text_encoder=True))
    names = weight_digests(trained)[0]
    assert names and all(".lora_" in name for name in names)
    assert any(name.startswith("UNet2DConditionModel.") for name in names)
    assert any(name.startswith("CLIPTextModel.") for name in names)
    others = copy.deepcopy(trained)
    name, adapter = next((n, p) for n, p in others[1].named_parameters() if "lora_B" in n)
    adapter.data[0, 0] += 1e-3
    with pytest.raises(RuntimeError, match=rf"CLIPTextModel\.{name} on process\(es\) \[1\] differs"):
        check_in_sync(TwoProcesses(others), trained)


@pytest.mark.slow
def test_two_real_processes(tmp_path):
    """Two gloo processes under `accelerate launch` (tests/sync_check.py): identical weights pass; two elements
    swapped on process 1 are named on both processes."""
    result = subprocess.run([*_two_process_launcher(), str(ROOT / "tests" / "sync_check.py")], cwd=tmp_path,
                            env=_env(tmp_path, {"ACCELERATE_USE_CPU": "1"}), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "weights identical on all 2 processes (2 trained tensors" in result.stderr
    for rank in (0, 1):
        assert f"process {rank}: the 2 processes ended with different weights: Sequential.1.weight on process(es) " \
               "[1] differs" in result.stdout
