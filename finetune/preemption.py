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
    by `method` (by default the one multiprocessing would use, without fixing it). The workers need to start with
    the signals blocked in their every thread, which fork and spawn pass on; a forkserver passes on its own mask,
    set when it started, for every process it forks: workers that would start from one start by spawn instead
    (which a forkserver exists to be as safe as). Nothing where a process cannot tell who sent a signal
    (`sigwaitinfo`: Linux and most Unix systems, not macOS or Windows): there the workers are torch's own."""
    if not workers or not hasattr(signal, "sigwaitinfo"):
        return {}
    method = method or multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return {"multiprocessing_context": _SHIELDED["spawn" if method == "forkserver" else method](),
            "worker_init_fn": shield_worker}


SHIELDED_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _starts_shielded(kind: type) -> type:
    """`kind` of process, started with SIGTERM and SIGINT blocked in the starting thread, so that the new process
    and every thread it starts have them blocked (a mask is inherited through fork and exec, and Python leaves it
    as it finds it): in a worker, threads start before `worker_init_fn` runs, and a signal for the run would reach
    one of them otherwise. The blocking lasts for the start only in this process (a signal meanwhile waits, then
    reaches the run's handler)."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED_SIGNALS)
        try:
            kind.start(self)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    return type(f"Shielded{kind.__name__}", (kind,), {"start": start, "__module__": __name__})


# Module-level classes, so that spawn can pickle a process by its class's name.
if hasattr(signal, "sigwaitinfo"):
    ShieldedForkProcess = _starts_shielded(multiprocessing.context.ForkProcess)
    ShieldedSpawnProcess = _starts_shielded(multiprocessing.context.SpawnProcess)
    _SHIELDED = {
        "fork": type("ShieldedForkContext", (multiprocessing.context.ForkContext,), {"Process": ShieldedForkProcess}),
        "spawn": type("ShieldedSpawnContext", (multiprocessing.context.SpawnContext,),
                      {"Process": ShieldedSpawnProcess}),
    }


def shield_worker(worker_id: int) -> None:
    """`DataLoader(worker_init_fn=...)`, with `shielded_workers`: this worker keeps serving batches through a
    SIGINT or SIGTERM meant for the run, until the trainer has written its checkpoint and shuts the loader down.
    SIGINT is ignored (nothing else sends a worker one). SIGTERM, blocked since the worker started, is taken by a
    thread, which ends the worker when the trainer that started it sent it, as torch's own handler for workers
    does (exit status 0, so that the trainer's loader does not report a dead worker; torch's clean-up terminates a
    worker that does not stop when asked), or when that trainer has gone (checked every second). From anyone else
    torch's handler dies of it; this one leaves it to the trainer. (Processes a worker starts, such as a `pipe:`
    shard's command, inherit the blocked SIGTERM and the ignored SIGINT; they end when their pipe closes.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (already, when started shielded)
    trainer = multiprocessing.parent_process()  # (the process that started this one)

    def wait() -> None:
        while True:
            sent = signal.sigtimedwait({signal.SIGTERM}, 1.0)
            if (sent.si_pid == trainer.pid) if sent else not trainer.is_alive():
                os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-trainer", daemon=True).start()
