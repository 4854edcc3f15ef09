"""Dataloader workers through the run's signals (`preemption.shielded_workers`): a SIGTERM or SIGINT sent to the
whole process group (SLURM signals every process of a job step; a terminal's Ctrl-C its foreground group) must
leave the workers serving, or the trainer dies of a "killed" worker before it can write its checkpoint. The
trainer's side is tests/test_train.py's."""

import os
import signal
import subprocess
import time

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from finetune.preemption import shielded_workers


class _Counting(IterableDataset):
    def __iter__(self):
        for i in range(10**6):
            time.sleep(0.005)
            yield i


def _loader(shielded: bool, persistent: bool = False, method: str | None = None):
    return DataLoader(_Counting(), batch_size=2, num_workers=1, persistent_workers=persistent,
                      **(shielded_workers(1, method) if shielded else {}))


def _send_from_another_process(pid: int, signum: int) -> None:
    subprocess.run(["kill", f"-{signal.Signals(signum).name[3:]}", str(pid)], check=True)


def _alive_after(worker, seconds: float = 1.0) -> bool:
    worker.join(timeout=seconds)
    return worker.is_alive()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("method, persistent", [("fork", False), ("fork", True), ("spawn", False),
                                                ("forkserver", True)])
def test_a_shielded_worker_serves_on_through_a_signal_from_another_process(signum, method, persistent):
    """Whichever way the workers start (fork is Linux's default up to Python 3.13, forkserver from 3.14), and
    whether they last one epoch or the run."""
    batches = iter(_loader(shielded=True, persistent=persistent, method=method))
    first = next(batches)
    [worker] = batches._workers
    _send_from_another_process(worker.pid, signum)
    assert _alive_after(worker)
    later = [next(batches) for _ in range(3)]  # (the trainer's SIGCHLD check would raise here for a dead one)
    assert torch.equal(first, torch.tensor([0, 1])) and torch.equal(later[-1], torch.tensor([6, 7]))
    del batches


def test_its_parents_sigterm_still_ends_a_shielded_worker_with_status_0():
    """torch's clean-up terminates a worker that does not stop when asked; a status of 0 is what torch's own
    handler gives (another would be reported as a failed worker)."""
    batches = iter(_loader(shielded=True))
    next(batches)
    [worker] = batches._workers
    os.kill(worker.pid, signal.SIGTERM)
    assert not _alive_after(worker, 10) and worker.exitcode == 0


def test_an_unshielded_worker_dies_of_a_sigterm_from_another_process():
    """What the shield is for: torch's handler in a worker dies of any SIGTERM but its parent's."""
    batches = iter(_loader(shielded=False))
    next(batches)
    [worker] = batches._workers
    with pytest.raises(RuntimeError, match=rf"DataLoader worker \(pid(\(s\))? {worker.pid}\) (is killed|exited)"):
        _send_from_another_process(worker.pid, signal.SIGTERM)  # (torch's SIGCHLD handler raises where it lands,
        _alive_after(worker, 10)  # or the next batch finds the worker gone)
        next(batches)
    assert worker.exitcode == -signal.SIGTERM


def test_no_workers_no_arguments():
    assert shielded_workers(0) == {}
