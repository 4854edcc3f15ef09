"""Non-finite losses and gradients, on any process.

By default (`train.on_nonfinite: error`) the run stops with an error naming the first bad step, its loss, its
gradient norm and its batch's sample keys. The check reads the losses of several steps at once, at each logging
step and before every checkpoint, validation and export, so the GPU never waits for the host in between (a
host sync per step costs a GPU run its overlap of Python and kernels); no checkpoint or export is written after
a bad step. With `train.on_nonfinite: skip` the optimizer step must be skipped before it happens, so every step
is checked (one host sync per step), on every process alike, and the run stops after
`train.max_nonfinite_steps` in a row.

Under fp16 the loss scaler owns gradient overflows: it grows the scale until a step's gradients overflow, skips that
step by design and halves the scale. Those steps are counted and logged (`fp16_overflow_steps`, `loss_scale`), not
treated as bad; the guard acts on non-finite losses, and on a scale that fell below `MIN_LOSS_SCALE` (the gradients
overflow float16 even unscaled, which no scale absorbs).
"""

import logging
import math

import torch
from accelerate import Accelerator

from .performance import step_optimizer

logger = logging.getLogger(__name__)

# As DeepSpeed's fp16 `min_loss_scale`: below 1 the scaler shrinks gradients that overflow at their own size.
MIN_LOSS_SCALE = 1.0


class NonFiniteGuard:
    def __init__(self, on_nonfinite: str, max_nonfinite_steps: int, every: int):
        self.on_nonfinite, self.max_nonfinite_steps, self.every = on_nonfinite, max_nonfinite_steps, every
        self.consecutive = 0
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, list[str]]] = []  # error mode: not yet checked
        self.overflows = 0  # fp16: optimizer steps the loss scaler skipped

    def step(self, optimizer) -> None:
        """The optimizer step; under fp16 the scaler may skip it (an overflow), which is counted."""
        step_optimizer(optimizer)
        if getattr(optimizer, "scaler", None) is not None and optimizer.gradient_state.sync_gradients:
            self.overflows += optimizer.step_was_skipped  # (between accumulation steps the flag is the last step's)

    def skip_step(self, accelerator: Accelerator, loss: torch.Tensor, grad_norm: torch.Tensor, step: int,
                  keys: list[str]) -> bool:
        """Whether to skip this optimizer step; raises when the run must stop. In error mode the step is kept for
        `check` (no host sync); in skip mode, one host sync (and, with several processes, one all-reduce)."""
        scaler = getattr(accelerator, "scaler", None)
        if self.on_nonfinite == "error":
            self.pending.append((step, loss.detach(), torch.as_tensor(grad_norm).detach(), keys))
            return False
        value = loss.item()
        norm_ok = scaler is not None or math.isfinite(float(grad_norm))  # fp16: an overflow is the scaler's to skip
        bad = torch.tensor([0.0 if math.isfinite(value) and norm_ok else 1.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            self.consecutive = 0
            return False
        self.consecutive += 1
        where = (f"non-finite loss or gradient norm at step {step} on some process (here, process "
                 f"{accelerator.process_index}: loss {value}, grad norm {float(grad_norm)}, batch keys {keys})")
        if self.on_nonfinite == "error":
            raise FloatingPointError(f"{where}; no checkpoint was written after it. Lower train.learning_rate, "
                                     "check the data, or set train.on_nonfinite: skip")
        if self.consecutive > self.max_nonfinite_steps:
            raise FloatingPointError(f"{where}: {self.consecutive} in a row, more than "
                                     f"train.max_nonfinite_steps={self.max_nonfinite_steps}")
        logger.warning(f"{where}; skipping this optimizer step ({self.consecutive} in a row)")
        if scaler is not None:  # the clipping unscaled the gradients: without an update, the next unscale_ raises
            scaler.update()
        return True

    def check(self, accelerator: Accelerator, step: int, force: bool = False) -> None:
        """Error mode, every `every` steps or when `force`d (before a checkpoint, validation or export): raise for
        the first step since the last check whose loss or gradient norm was not finite on some process. One host
        sync (and, with several processes, one all-reduce) for all those steps."""
        if not force and step % self.every:
            return
        self._check_loss_scale(accelerator, step)
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        values = torch.stack([torch.stack([loss.float(), norm.to(loss.device).float()])
                              for _, loss, norm, _ in pending])
        judged = values if getattr(accelerator, "scaler", None) is None else values[:, :1]  # fp16: the losses only
        bad = (~torch.isfinite(judged)).any(dim=1).float()
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, reduction="sum")
        first = next((i for i, flag in enumerate(bad.tolist()) if flag), None)
        if first is None:
            return
        (at, _, _, keys), (loss, norm) = pending[first], values[first].tolist()
        raise FloatingPointError(f"non-finite loss or gradient norm at step {at} on some process (here, process "
                                 f"{accelerator.process_index}: loss {loss}, grad norm {norm}, batch keys {keys}); "
                                 "no checkpoint or export was written after it. Lower train.learning_rate, check the "
                                 "data, or set train.on_nonfinite: skip")

    def _check_loss_scale(self, accelerator: Accelerator, step: int) -> None:
        """fp16: log the scale and the overflow steps so far; raise when the scale fell below MIN_LOSS_SCALE."""
        scaler = getattr(accelerator, "scaler", None)
        if scaler is None:
            return
        scale = scaler.get_scale()
        accelerator.log({"loss_scale": scale, "fp16_overflow_steps": self.overflows}, step=step)
        if scale < MIN_LOSS_SCALE:
            raise FloatingPointError(f"fp16: the loss scale fell to {scale:g} by step {step} ({self.overflows} steps "
                                     "skipped by the scaler for overflowing gradients): the gradients overflow "
                                     "float16 even unscaled. Train in bf16 (train.mixed_precision=bf16), or lower "
                                     "train.learning_rate")
