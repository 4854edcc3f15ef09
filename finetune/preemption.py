"""Stop cleanly when asked: SIGTERM (schedulers, torch elastic) or SIGINT (Ctrl-C).

The handler only records the request; the training loop asks `requested()` at step boundaries: a single process
stops at the next one; several agree (one of them signalled is enough) at the next logging step, or earlier
where a checkpoint or validation is due, so nothing long runs between the signal and the stop. Then they write
a checkpoint and exit.
"""

import signal

import torch
from accelerate import Accelerator


class StopOnSignal:
    """Records SIGTERM / SIGINT instead of dying mid-step; restores the previous handlers on `close()`."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, accelerator: Accelerator, step: int, every: int, force: bool = False) -> bool:
        """True on every process once any process has been signalled. With several processes they agree every
        `every` steps and when `force`d (one all-reduce and host sync then, none in between)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        if step % every and not force:
            return False
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def close(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
