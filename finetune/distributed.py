"""Checks and endings that every process of a multi-process run takes part in."""

import hashlib

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

logger = get_logger("finetune")


def weight_digests(models: list[torch.nn.Module]) -> tuple[list[str], torch.Tensor]:
    """The name and SHA-256 digest (32 uint8 values) of every trained weight of `models` (those that require a
    gradient: the whole model when it trains in full, its adapters with LoRA), in a fixed order. Any changed bit
    changes a digest, a swap of two elements too."""
    names, digests = [], []
    for model in models:
        for name, param in model.named_parameters():
            if param.requires_grad:
                data = param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                names.append(f"{type(model).__name__}.{name}")
                digests.append(torch.tensor(list(hashlib.sha256(data).digest()), dtype=torch.uint8))
    return names, torch.stack(digests)


def check_in_sync(accelerator: Accelerator, models: list[torch.nn.Module]) -> None:
    """Every process must hold the same trained weights (DDP averages gradients); a mismatch means the processes
    did not really train together. The processes compare the digest of each trained tensor of `models`; the first
    tensor that differs is named."""
    if accelerator.num_processes == 1:
        return
    names, digests = weight_digests([accelerator.unwrap_model(model, keep_torch_compile=False) for model in models])
    gathered = accelerator.gather(digests.to(accelerator.device)).cpu().reshape(accelerator.num_processes,
                                                                                 *digests.shape)
    differs = (gathered != gathered[0]).any(dim=-1)  # (process, tensor)
    if differs.any():
        index = int(differs.any(dim=0).nonzero()[0])
        processes = differs[:, index].nonzero().flatten().tolist()
        raise RuntimeError(f"the {accelerator.num_processes} processes ended with different weights: {names[index]} "
                           f"on process(es) {processes} differs from process 0 (SHA-256 of each trained tensor "
                           "compared); their gradients were not synchronised")
    logger.info(f"weights identical on all {accelerator.num_processes} processes ({len(names)} trained tensors, "
                "compared by SHA-256)", main_process_only=True)


def finish(accelerator: Accelerator) -> None:
    """End the run on every process together. Tearing the process group down right after a collective can
    deadlock gloo at exit (its worker thread waits for the GIL that the exiting main thread holds while joining
    it), so every process first waits at a barrier, which holds no Python tensors."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
