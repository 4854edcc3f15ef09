"""Non-finite losses and gradients: caught at the step they happen, on any process.

By default the run stops with an error naming the step and the batch's sample keys, before anything (weights,
EMA, a checkpoint) is touched by the bad gradient. With `train.on_nonfinite: skip` the optimizer step is
skipped instead, on every process alike, and the run stops after `train.max_nonfinite_steps` in a row.
"""

import logging
import math
import os

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)


# Fault injection for tests: "STEP:RANK" makes that process see a NaN loss at that optimizer step.
FAULT_ENV = "FINETUNE_FAULT_NONFINITE"


class NonFiniteGuard:
    def __init__(self, on_nonfinite: str, max_nonfinite_steps: int):
        self.on_nonfinite, self.max_nonfinite_steps = on_nonfinite, max_nonfinite_steps
        self.consecutive = 0
        fault = os.environ.get(FAULT_ENV)
        self.fault = tuple(int(v) for v in fault.split(":")) if fault else None

    def skip_step(self, accelerator: Accelerator, loss: torch.Tensor, grad_norm: torch.Tensor, step: int,
                  keys: list[str]) -> bool:
        """Whether to skip this optimizer step; raises when the run must stop. One host sync (and, with several
        processes, one all-reduce) per optimizer step."""
        value = loss.item()
        if self.fault == (step, accelerator.process_index):
            value, self.fault = math.nan, None  # once
        bad = torch.tensor([0.0 if math.isfinite(value) and math.isfinite(float(grad_norm)) else 1.0],
                           device=accelerator.device)
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
        return True
