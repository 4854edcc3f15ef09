"""The non-finite guard under fp16: overflows belong to the loss scaler, driven here the way accelerate drives it
(`clip_grad_norm_` unscales, `AcceleratedOptimizer.step` is `scaler.step` + `scaler.update`), with torch's CPU
GradScaler."""

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from finetune.nonfinite import NonFiniteGuard


def _setup(mode, init_scale=2.0**16):
    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), device_placement=False,
                                     scaler=scaler)
    logged = []
    accelerator = SimpleNamespace(scaler=scaler, num_processes=1, process_index=0, device=torch.device("cpu"),
                                  log=lambda values, step: logged.append((step, values)))
    return model, optimizer, accelerator, NonFiniteGuard(mode, max_nonfinite_steps=3, every=1), logged


def _train_step(model, optimizer, accelerator, guard, step, overflow=False, nan_loss=False):
    """One step as the trainer takes it: backward of the scaled loss, unscale + clip, the guard, the step."""
    loss = model(torch.ones(2, 4)).pow(2).mean() * (math.nan if nan_loss else 1.0)
    accelerator.scaler.scale(loss).backward()
    if overflow:  # a gradient that overflowed at this scale
        model.weight.grad[0, 0] = math.inf
    accelerator.scaler.unscale_(optimizer.optimizer)  # what accelerator.clip_grad_norm_ does under fp16
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    skip = guard.skip_step(accelerator, loss, grad_norm, step, [f"key-{step}"])
    if not skip:
        guard.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    guard.check(accelerator, step)
    return skip


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_an_overflow_is_the_scalers_to_skip(mode):
    model, optimizer, accelerator, guard, logged = _setup(mode)
    _train_step(model, optimizer, accelerator, guard, 1)
    before = model.weight.detach().clone()
    _train_step(model, optimizer, accelerator, guard, 2, overflow=True)  # no error, no "unscale_() already called"
    assert torch.equal(model.weight, before)  # the scaler skipped it
    assert accelerator.scaler.get_scale() == 2.0**15 and guard.overflows == 1
    _train_step(model, optimizer, accelerator, guard, 3)
    assert not torch.equal(model.weight, before)
    assert logged[-1] == (3, {"loss_scale": 2.0**15, "fp16_overflow_steps": 1})


def test_a_nan_loss_still_stops_an_fp16_run():
    model, optimizer, accelerator, guard, _ = _setup("error")
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient norm at step 2"):
        _train_step(model, optimizer, accelerator, guard, 2, nan_loss=True)


def test_skip_mode_skips_a_nan_loss_and_the_scaler_goes_on():
    model, optimizer, accelerator, guard, _ = _setup("skip")
    assert _train_step(model, optimizer, accelerator, guard, 1, nan_loss=True)
    assert not _train_step(model, optimizer, accelerator, guard, 1)  # the next unscale_ works


def test_a_collapsing_loss_scale_stops_the_run():
    model, optimizer, accelerator, guard, _ = _setup("error", init_scale=4.0)
    for step in range(1, 3):
        _train_step(model, optimizer, accelerator, guard, step, overflow=True)
    with pytest.raises(FloatingPointError, match=r"loss scale fell to 0.5 by step 3 \(3 steps skipped"):
        _train_step(model, optimizer, accelerator, guard, 3, overflow=True)


def test_the_error_names_the_real_gradient_norm():
    """Under fp16 the gradient norm does not decide, but the message still reports it as it was."""
    model, optimizer, accelerator, guard, _ = _setup("error")
    with pytest.raises(FloatingPointError, match="loss nan, grad norm nan"):
        _train_step(model, optimizer, accelerator, guard, 1, nan_loss=True)
