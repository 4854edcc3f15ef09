"""What a run shows while it trains: the progress bar and the periodic loss / LR / gradient-norm / step-time
logs sent to the trackers."""

import time

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm


class StepLogger:
    """Accumulates the loss on the device and logs loss, LR, gradient norm and step time every `every` steps
    (the per-step non-finite check already reads the loss on the host, so logging adds no wait of its own)."""

    def __init__(self, accelerator: Accelerator, total: int, every: int, step: int):
        self.progress = tqdm(total=total, initial=step, disable=not accelerator.is_main_process, desc="train")
        self.accelerator, self.every = accelerator, every
        self.loss_sum, self.count = torch.zeros((), device=accelerator.device), 0
        self.start, self.start_step = time.perf_counter(), step

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.count += 1

    def step(self, step: int, last: bool, lr: float, grad_norm) -> None:
        self.progress.update(1)
        if step % self.every and not last:
            return
        logs = {"loss": (self.loss_sum / self.count).item(), "lr": lr, "grad_norm": float(grad_norm),
                "step_time": (time.perf_counter() - self.start) / (step - self.start_step)}
        self.accelerator.log(logs, step=step)
        self.progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
        self.loss_sum.zero_()
        self.count, self.start, self.start_step = 0, time.perf_counter(), step
