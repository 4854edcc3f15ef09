"""Checks and endings that every process of a multi-process run takes part in."""

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

logger = get_logger("finetune")


def check_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Every process must hold the same weights (DDP averages gradients); a mismatch means the processes did
    not really train together."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    checksums = accelerator.gather(checksum.to(accelerator.device))
    if not torch.all(checksums == checksums[0]):
        raise RuntimeError(f"the {accelerator.num_processes} processes ended with different weights "
                           f"(checksums {checksums.tolist()}); their gradients were not synchronised")
    logger.info(f"weights identical on all {accelerator.num_processes} processes", main_process_only=True)


def finish(accelerator: Accelerator) -> None:
    """End the run on every process together. Tearing the process group down right after a collective can
    deadlock gloo at exit (its worker thread waits for the GIL that the exiting main thread holds while joining
    it), so every process first waits at a barrier, which holds no Python tensors."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
