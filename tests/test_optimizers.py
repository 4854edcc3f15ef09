"""The optimizers of `train.optimizer`: each resumes exactly, schedule-free samples and saves its average, and settings
that cannot work are refused before anything trains."""

import copy
import os

import pytest
import torch
from safetensors.torch import load_file

from finetune import performance
from finetune.cli import UserError
from finetune.config import ConfigError, TrainConfig, load_config
from finetune.data import shapes
from finetune.models import build_components

from .conftest import TINY_RUN
from .test_train import ROOT, _train

RESUMABLE = {
    "sgd": ["train.optimizer=sgd", "train.optimizer_args={momentum: 0.9}"],
    "adafactor": ["train.optimizer=adafactor"],
    "prodigy": ["train.optimizer=prodigy", "train.learning_rate=1.0"],
    "adamw_schedulefree": ["train.optimizer=adamw_schedulefree", "train.lr_scheduler=constant"],
    "adamw_8bit": ["train.optimizer=adamw_8bit"],  # bitsandbytes >= 0.50 runs it on the CPU
}


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMABLE)
def test_every_optimizer_resumes_exactly(tmp_path, name):
    """A run resumed from its step-3 checkpoint ends with the weights (and, for schedule-free, the averaged export)
    of the run that never stopped."""
    common = [*RESUMABLE[name], "train.max_train_steps=6", "train.checkpointing_steps=3", "train.use_ema=false",
              "model.train_text_encoder=false", "train.lr_warmup_steps=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(tmp_path, *common, f"train.output_dir={full}")
    resumed.mkdir()
    os.symlink(full / "checkpoint-3", resumed / "checkpoint-3")
    _train(tmp_path, *common, f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest")
    for name_ in ("checkpoint-6/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(full / name_), load_file(resumed / name_)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name_
    if name == "adamw_schedulefree":
        _assert_the_export_is_the_average(full)


def _assert_the_export_is_the_average(out):
    """The exported UNet is x = y + (1 - 1/beta1)(z - y), schedule-free's average, computed here from the last
    checkpoint's training weights y and the optimizer's z, and not y itself."""
    trained, exported = load_file(out / "checkpoint-6" / "model.safetensors"), \
        load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    state = torch.load(out / "checkpoint-6" / "optimizer.bin", weights_only=True)
    beta1 = state["param_groups"][0]["betas"][0]
    config = load_config(ROOT / "configs" / "shapes.yaml", TINY_RUN)  # the run's architecture
    components = build_components(config.model, config.data.resolution, shapes.all_captions())
    names = [name for name, _ in components.unet.named_parameters()]  # the optimizer's order (all train)
    differ = 0
    for index, name in enumerate(names):
        y, z = trained[name], state["state"][index]["z"]
        torch.testing.assert_close(exported[name], y.lerp(z, 1 - 1 / beta1), rtol=0, atol=1e-6, msg=name)
        differ += not torch.equal(exported[name], y)
    assert differ > len(names) // 2


def test_the_average_is_in_the_weights_only_while_sampling_and_saving():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = performance.make_optimizer(list(model.parameters()), TrainConfig(
        optimizer="adamw_schedulefree", lr_scheduler="constant", use_ema=False, learning_rate=0.1,
        lr_warmup_steps=0), torch.device("cpu"))
    for _ in range(3):
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    y = [p.detach().clone() for p in model.parameters()]
    reference = copy.deepcopy(optimizer)
    reference.eval()  # the average, as schedule-free computes it
    x = [p.detach().clone() for group in reference.param_groups for p in group["params"]]
    with performance.averaged_weights(optimizer):
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), x))
        assert not all(torch.equal(p, t) for p, t in zip(model.parameters(), y))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), y))  # y back bit for bit
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # (in train mode again: schedule-free refuses a step in eval mode)
    with performance.averaged_weights(torch.optim.SGD(model.parameters(), lr=0.1)):
        pass  # other optimizers: nothing happens


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer=adamw_schedulefree", "train.use_ema=false"], "train.lr_scheduler: cosine would fight"),
    (["train.optimizer=adamw_schedulefree", "train.lr_scheduler=constant"], "train.use_ema: adamw_schedulefree"),
    (["train.optimizer=prodigy", "train.use_8bit_adam=true"], "train.use_8bit_adam: true asks for adamw_8bit"),
    (["train.optimizer_args=[0.9]"], "train.optimizer_args: got"),
])
def test_optimizer_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_wrong_argument_or_a_missing_package_is_one_line(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(UserError, match="train.optimizer_args: .*momentun"):
        performance.make_optimizer(params, TrainConfig(optimizer="sgd", optimizer_args={"momentun": 0.9}),
                                   torch.device("cpu"))
    real = performance.importlib.import_module

    def missing(name):
        if name == "prodigyopt":
            raise ImportError("No module named 'prodigyopt'")
        return real(name)

    monkeypatch.setattr(performance.importlib, "import_module", missing)
    with pytest.raises(UserError, match=r"prodigy needs the prodigyopt package: pip install "
                                        r"'finetune-ddpm\[optimizers\]'"):
        performance.make_optimizer(params, TrainConfig(optimizer="prodigy"), torch.device("cpu"))


def test_8bit_adamw_keeps_8_bit_moments_on_the_cpu(monkeypatch):
    """bitsandbytes >= 0.50 runs its blockwise 8-bit AdamW on the CPU: the moments are uint8 (a quarter of
    AdamW's float32); an older bitsandbytes is refused on the CPU, naming the version to install."""
    import bitsandbytes

    weight = torch.nn.Parameter(torch.ones(64, 64))  # 4,096 values: bitsandbytes' 8-bit minimum
    train = load_config(None, ["train.optimizer=adamw_8bit", "train.learning_rate=1e-2"]).train
    optimizer = performance.make_optimizer([weight], train, torch.device("cpu"))
    weight.sum().backward()
    optimizer.step()
    state = optimizer.state[weight]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8 and weight[0, 0] < 1
    monkeypatch.setattr(bitsandbytes, "__version__", "0.49.2")
    with pytest.raises(ValueError, match=r"bitsandbytes >= 0.50 on the CPU .*with bitsandbytes 0.49.2"):
        performance.make_optimizer([weight], train, torch.device("cpu"))
