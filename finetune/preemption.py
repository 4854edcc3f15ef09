"""Stop cleanly when asked: SIGTERM (schedulers, torch elastic) or SIGINT (Ctrl-C).

The handler only records the request; the training loop asks `requested()` at step boundaries: a single process
stops at the next one; several agree (one of them signalled is enough) at the next logging step, or earlier
where a checkpoint or validation is due, so nothing long runs between the signal and the stop. Then they write
a checkpoint and exit.

The signal often reaches the dataloader workers too: a terminal's Ctrl-C goes to its whole foreground process
group, and SLURM signals every process of a job step. A worker that died of it would take the run down with it
(the trainer's next step raises "DataLoader worker ... is killed by signal"), before any checkpoint, so each
worker leaves both to the trainer (`shield_worker`).
"""

import multiprocessing
import multiprocessing.context
import os
import signal
import threading

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


def shielded_workers(workers: int, method: str | None = None) -> dict:
    """The DataLoader's arguments that keep its `workers` worker processes alive through the run's signals, started
    by `method` (multiprocessing's default when None). None where the platform cannot tell who sent a signal
    (`sigwaitinfo`: Linux and most Unix systems, not macOS or Windows): there the workers are torch's own."""
    if not workers or not hasattr(signal, "sigwaitinfo"):
        return {}
    return {"multiprocessing_context": _SHIELDED[method or multiprocessing.get_start_method()](),
            "worker_init_fn": shield_worker}


def _starts_shielded(kind: type) -> type:
    """`kind` of process, started with SIGTERM blocked in the starting thread, so that the new process and every
    thread it starts have it blocked (a mask is inherited through fork and exec): in a worker, threads start before
    `worker_init_fn` runs, and a SIGTERM for the run would reach one of them otherwise. The blocking lasts for the
    start only in this process (a signal meanwhile waits, then reaches the run's handler)."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            kind.start(self)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    return type(f"Shielded{kind.__name__}", (kind,), {"start": start, "__module__": __name__})


# Module-level classes, so that spawn and forkserver can pickle a process by its class's name.
if hasattr(signal, "sigwaitinfo"):
    ShieldedForkProcess = _starts_shielded(multiprocessing.context.ForkProcess)
    ShieldedSpawnProcess = _starts_shielded(multiprocessing.context.SpawnProcess)
    ShieldedForkServerProcess = _starts_shielded(multiprocessing.context.ForkServerProcess)
    _SHIELDED = {
        "fork": type("ShieldedForkContext", (multiprocessing.context.ForkContext,), {"Process": ShieldedForkProcess}),
        "spawn": type("ShieldedSpawnContext", (multiprocessing.context.SpawnContext,),
                      {"Process": ShieldedSpawnProcess}),
        "forkserver": type("ShieldedForkServerContext", (multiprocessing.context.ForkServerContext,),
                           {"Process": ShieldedForkServerProcess}),
    }


def shield_worker(worker_id: int) -> None:
    """`DataLoader(worker_init_fn=...)`, with `shielded_workers`: this worker keeps serving batches through a
    SIGINT or SIGTERM meant for the run, until the trainer has written its checkpoint and shuts the loader down.
    SIGINT is ignored (nothing else sends a worker one). SIGTERM, blocked since the worker started, is taken by a
    thread, which ends the worker only when its parent sent it, as torch's own handler for workers does (exit
    status 0, so that the parent's loader does not report a dead worker): torch's clean-up terminates a worker
    that does not stop when asked, and still can. From anyone else torch's handler dies of it; this one leaves it
    to the trainer. A worker whose parent has gone stops by torch's watchdog, signal or not."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (already, when started shielded)
    parent = os.getppid()

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()
