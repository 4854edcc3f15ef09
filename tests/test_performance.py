"""The speed and memory levers: what they switch on, and the clear refusals of the GPU-only ones on a CPU."""

import contextlib
import math
from types import SimpleNamespace

import accelerate.optimizer
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from finetune import performance
from finetune.config import TrainConfig, load_config
from finetune.export import exported

from .test_train import _train


def test_auto_precision_is_bf16_where_native(monkeypatch):
    monkeypatch.setattr(performance, "native_bf16", lambda device: True)
    assert performance.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(performance, "native_bf16", lambda device: False)
    assert performance.resolve_precision("auto") == "no"
    assert performance.resolve_precision("fp16") == "fp16" and performance.resolve_precision("no") == "no"


def test_gradient_checkpointing_gives_the_same_gradients(tiny_components):
    unet, text_encoder = tiny_components.unet, tiny_components.text_encoder
    sample, timesteps = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    ids = tiny_components.tokenizer(["a red circle", "a blue square"], padding="max_length",
                                    return_tensors="pt").input_ids

    def gradients():
        unet.zero_grad(), text_encoder.zero_grad()
        unet(sample, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample.square().mean().backward()
        return [p.grad.clone() for p in [*unet.parameters(), *text_encoder.parameters()]]

    unet.train(), text_encoder.train()
    before = gradients()
    performance.speed_up(unet, [text_encoder], TrainConfig(gradient_checkpointing=True), torch.device("cpu"))
    assert unet.is_gradient_checkpointing and text_encoder.is_activation_checkpointing
    for a, b in zip(before, gradients()):
        torch.testing.assert_close(a, b)


def test_compile_is_in_place(tiny_components):
    unet = tiny_components.unet
    keys = list(unet.state_dict())
    performance.speed_up(unet, [], TrainConfig(compile=True), torch.device("cpu"))
    assert unet._compiled_call_impl is not None  # compiled lazily at the first call
    assert list(unet.state_dict()) == keys  # saving and checkpoints see the same module


def test_a_compiled_unet_samples_eagerly(tiny_components):
    """Validation and the export's grid sample a compiled UNet without compiling it (the sampling shapes would
    compile anew, for a few images); the training step outside still compiles."""
    graphs = []

    def backend(graph, inputs):
        graphs.append(graph)
        return graph.forward

    unet = tiny_components.unet
    unet.compile(backend=backend)
    accelerator = SimpleNamespace(unwrap_model=lambda model: model, autocast=contextlib.nullcontext,
                                  is_main_process=True, distributed_type=DistributedType.NO)
    with exported(accelerator, tiny_components, []) as models:
        pipe = models.pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe(["a red circle"], num_inference_steps=2, guidance_scale=2.0, output_type="np")
    assert graphs == []
    unet(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]),
         encoder_hidden_states=tiny_components.text_encoder(torch.ones(2, 4, dtype=torch.long))[0])
    assert graphs


@pytest.mark.parametrize("override, message", [
    ("train.enable_xformers_memory_efficient_attention=true",
     "train.enable_xformers_memory_efficient_attention needs a CUDA GPU"),
    ("train.optimizer_cpu_offload=true train.max_grad_norm=0",
     "train.optimizer_cpu_offload moves the optimizer from a CUDA GPU"),
])
def test_gpu_only_levers_refuse_on_a_cpu(tmp_path, override, message):
    result = _train(tmp_path, *override.split(), "--dry-run", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0 and message in result.stderr


def test_tf32_is_a_no_op_on_a_cpu_and_auto_precision_loads(tmp_path):
    config = load_config(None, ["train.allow_tf32=true", "train.mixed_precision=auto"])
    performance.configure_backends(config.train, torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32
    result = _train(tmp_path, "train.mixed_precision=auto", "--dry-run", f"train.output_dir={tmp_path / 'run'}")
    expected = "bf16" if performance.native_bf16(torch.device("cpu")) else "no"
    assert f"precision {expected}," in result.stdout


def test_logged_step_times_cover_the_whole_run(monkeypatch):
    """The logged step_time windows follow each other without a gap: each includes the wait for the GPU at its
    log step and the previous window's logging, so step_time x steps adds up to the wall time (benchmarks read
    step_time; a window that restarted after the logging left both out)."""
    from finetune import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    logged = []

    def log(logs, step):
        logged.append(logs["step_time"])
        clock[0] += 0.5  # slow logging

    accelerator = SimpleNamespace(is_main_process=False, device=torch.device("cpu"), num_processes=1, log=log,
                                  reduce=lambda tensor, reduction: tensor)
    logger = progress.StepLogger(accelerator, TrainConfig(max_train_steps=4, logging_steps=1), 0)
    for step in range(1, 5):
        clock[0] += 1.0  # the step itself
        logger.add(torch.tensor(1.0))
        logger.step(step, step == 4, 0.1, torch.tensor(1.0))
    assert logged == [1.0, 1.5, 1.5, 1.5]
    assert sum(logged) == clock[0] - 0.5  # all but the last window's own logging


def test_the_logged_loss_is_the_mean_over_processes():
    """Each process's mean loss since the last log, averaged over the processes (here the other process's mean is
    3.0): not the main process's alone."""
    from finetune import progress

    logged, reduced = [], []

    def reduce(tensor, reduction):
        reduced.append(reduction)
        return (tensor + 3.0) / 2  # the mean with the other process's 3.0

    accelerator = SimpleNamespace(is_main_process=False, device=torch.device("cpu"), num_processes=2,
                                  log=lambda logs, step: logged.append(logs["loss"]), reduce=reduce)
    logger = progress.StepLogger(accelerator, TrainConfig(max_train_steps=2, logging_steps=2), 0)
    for step, loss in [(1, 0.5), (2, 1.5)]:
        logger.add(torch.tensor(loss))
        logger.step(step, step == 2, 0.1, torch.tensor(1.0))
    assert logged == [2.0] and reduced == ["mean"]


@pytest.mark.parametrize("max_norm", [0.05, math.inf])
@pytest.mark.parametrize("dtypes", ["one", "mixed"])
def test_direct_clipping_and_step_are_accelerates_bit_for_bit(monkeypatch, max_norm, dtypes):
    """`performance.clip_grad_norm` and `step_optimizer` call torch directly under a plain engine (accelerate's
    wrappers cost host time there, benchmarks/README.md): the same norms, and the same weights after three clipped
    steps, as through accelerate; the direct path is the one taken (accelerate's parts raise if reached). Gradients
    of one dtype take the foreach kernels without torch's wrapping, mixed ones torch's own functions (`mixed`: the
    last layer's weights in float64)."""
    accelerator = Accelerator(cpu=True)
    runs = []
    for direct in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        if dtypes == "mixed":
            model = torch.nn.Sequential(model[0], model[1], _To(torch.float64), model[2].double(), _To(torch.float32))
        optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True))
        params, norms = list(model.parameters()), []
        with contextlib.ExitStack() as stack:
            if direct:
                refuse = stack.enter_context(monkeypatch.context())
                refuse.setattr(accelerator, "_clip_grad_norm_dtensor_aware", None)
                refuse.setattr(accelerate.optimizer, "is_lomo_available", None)
            for _ in range(3):
                model(torch.randn(32, 8)).square().mean().backward()
                if direct:
                    norms.append(performance.clip_grad_norm(accelerator, params, max_norm))
                    performance.step_optimizer(optimizer)
                else:
                    norms.append(accelerator.clip_grad_norm_(params, max_norm))
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        runs.append((torch.stack(norms), torch.cat([p.detach().reshape(-1) for p in params])))
    (norms, weights), (direct_norms, direct_weights) = runs
    assert norms.min() > 0.05  # (so the clipping acts)
    assert torch.equal(norms, direct_norms) and torch.equal(weights, direct_weights)


class _To(torch.nn.Module):
    """Its input in `dtype`."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)
