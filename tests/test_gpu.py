"""Checks that need a CUDA GPU. Where there is none (this project's CI machines) they are skipped with that
reason; they run on a lent GPU machine (`pytest tests/test_gpu.py`), and benchmarks/README.md says when they
last did."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from finetune import performance
from finetune.config import load_config
from finetune.data.transforms import to_unit_range
from finetune.encoding import BatchEncoder
from finetune.families import text_conditioning
from finetune.nonfinite import NonFiniteGuard
from finetune.objective import on_device
from finetune.train import build_model, compute_loss, trainable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("cache", [True, False])
def test_a_lora_step_never_waits_for_the_gpu(tiny_sd_folder, cache):
    """A whole bf16 LoRA step (the noise and timesteps from the CPU generator, offset noise, the VAE and text
    encodings, or with data.cache the cached ones, latents drawn from the moments, min-SNR weights, forward,
    backward, clipping, the deferred non-finite check and fused AdamW) queues its kernels without one host sync
    once the first step has run: CUDA's sync debug mode turns any into an error. A sync per step stops the host
    from running ahead of the GPU."""
    config = load_config(None, [f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
                                "model.train_text_encoder=false", "data.resolution=16",
                                "train.snr_gamma=5", "train.noise_offset=0.05", "train.mixed_precision=bf16"])
    accelerator = Accelerator(mixed_precision="bf16")
    components, trained = build_model(config, None, accelerator)
    params = trainable(trained[0])
    unet, optimizer = accelerator.prepare(trained[0], performance.make_optimizer(params, config.train,
                                                                                accelerator.device))
    encoder = BatchEncoder(components.vae, text_conditioning(components), text_trains=False, cache=cache)
    schedule, guard = on_device(components.scheduler, accelerator.device), NonFiniteGuard("error", 0, 10)
    ids = components.tokenizer(["a red circle", "a blue square"], padding="max_length", return_tensors="pt")
    batch = {"key": ["a", "b"], "pixel_values": torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8).pin_memory(),
             "input_ids": ids.input_ids.pin_memory()}

    def step(number: int) -> None:
        loss, _ = compute_loss(batch, unet, encoder, schedule, accelerator.device, config.train)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, 1.0)
        assert not guard.skip_step(accelerator, loss, grad_norm, number, batch["key"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(1)  # initialises the optimizer state; with the cache, encodes the batch and copies it to the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for number in (2, 3):
            step(number)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    guard.check(accelerator, 3, force=True)  # the losses were finite (one sync, for both steps)
    assert (len(encoder.latent_cache), len(encoder.text_cache)) == ((2, 2) if cache else (0, 0))


def test_gpu_levers_apply_on_a_gpu(tiny_sd_folder):
    """TF32 and fused AdamW on the GPU, and auto precision picks bf16 there (an Ampere or later GPU)."""
    train = SimpleNamespace(allow_tf32=True)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        performance.configure_backends(train, torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    config = load_config(None, [])
    optimizer = performance.make_optimizer([torch.nn.Parameter(torch.ones(2, device="cuda"))], config.train,
                                           torch.device("cuda"))
    assert optimizer.defaults["fused"]
    if torch.cuda.get_device_capability() >= (8, 0):
        assert performance.resolve_precision("auto") == "bf16"


def test_8bit_adamw_keeps_8_bit_moments_on_a_gpu():
    """`train.use_8bit_adam` gives bitsandbytes' AdamW8bit, whose moments are stored in 8 bits (a quarter of
    AdamW's), and a step with it moves the weights. Needs bitsandbytes (an optional extra) besides the GPU."""
    bitsandbytes = pytest.importorskip("bitsandbytes")
    config = load_config(None, ["train.use_8bit_adam=true", "train.learning_rate=1e-2"])
    weight = torch.nn.Parameter(torch.ones(64, 64, device="cuda"))  # 4,096 values: bitsandbytes' 8-bit minimum
    optimizer = performance.make_optimizer([weight], config.train, torch.device("cuda"))
    assert isinstance(optimizer, bitsandbytes.optim.AdamW8bit)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert optimizer.state[weight]["state1"].dtype == torch.uint8
    assert bool((weight < 1).all())


def test_pixels_scale_on_the_gpu_to_the_bits_of_the_cpu():
    """The stream's uint8 pixels scaled on the GPU equal the CPU's scaling, for every value (a division by a host
    scalar would multiply by its reciprocal on CUDA, 1 ulp off for some)."""
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    assert torch.equal(to_unit_range(pixels.cuda()).cpu(), to_unit_range(pixels))


def test_the_trainers_own_loop_never_waits_for_the_gpu_between_logging_steps(tiny_sd_folder, tmp_path, monkeypatch):
    """The same, through `finetune.train.main` itself (the data loader, accumulation context, EMA, the stop and
    non-finite checks, the progress bar): from the end of step 1 to the next logging step, CUDA's sync debug mode
    turns any host sync into an error. It is switched off only inside StepLogger.step, whose logging steps read the
    loss by design, and back on after each step that is not the last."""
    from finetune import train
    from finetune.progress import StepLogger

    original, syncs_checked = StepLogger.step, []

    def step(self, number, last, lr, grad_norm):
        torch.cuda.set_sync_debug_mode("default")
        original(self, number, last, lr, grad_norm)
        if not last:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            syncs_checked.append(number + 1)

    monkeypatch.setattr(StepLogger, "step", step)
    try:
        train.main([f"model.pretrained_model_name_or_path={tiny_sd_folder}", "lora.enabled=true",
                    "model.train_text_encoder=false", "data.resolution=16", "data.num_samples=64",
                    "data.shuffle_buffer=16", "train.train_batch_size=4", "train.max_train_steps=8",
                    "train.logging_steps=4", "train.use_ema=true", "train.snr_gamma=5",
                    "train.mixed_precision=bf16", "validation.validation_steps=0",
                    "validation.num_inference_steps=2", "validation.num_images_per_prompt=1",
                    f"train.output_dir={tmp_path / 'run'}"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert syncs_checked == [2, 3, 4, 5, 6, 7, 8]


def test_cpu_offloaded_adamw_keeps_its_state_on_the_cpu():
    """`train.optimizer_cpu_offload` gives torchao's CPUOffloadOptimizer: the weights stay on the GPU and move, the
    moments of tensors from 4,096 values up (torchao's minimal_size) live on the CPU."""
    config = load_config(None, ["train.optimizer_cpu_offload=true", "train.learning_rate=1e-2",
                                "train.max_grad_norm=0"])
    weight = torch.nn.Parameter(torch.ones(64, 64, device="cuda"))
    optimizer = performance.make_optimizer([weight], config.train, torch.device("cuda"))
    weight.sum().backward()
    optimizer.step()
    assert weight.device.type == "cuda" and weight[0, 0].item() < 1
    states = [value for offloaded in optimizer.state_dict()["offloaded"] for state in offloaded["state"].values()
              for value in state.values() if torch.is_tensor(value) and value.dim() > 0]
    assert states and all(value.device.type == "cpu" for value in states)
