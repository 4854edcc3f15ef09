"""Dataloader workers through the run's signals (`preemption.shielded_workers`): a SIGTERM or SIGINT sent to the
whole process group (SLURM signals every process of a job step; a terminal's Ctrl-C its foreground group) must
leave the workers serving, or the trainer dies of a "killed" worker before it can write its checkpoint. The
trainer's side is tests/test_train.py's."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from finetune import preemption
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
@pytest.mark.parametrize("method, persistent", [("fork", False), ("fork", True), ("spawn", False)])
def test_a_shielded_worker_serves_on_through_a_signal_from_another_process(signum, method, persistent):
    """Whether the workers start by fork (Linux's default up to Python 3.13) or spawn, and last one epoch or
    the run."""
    batches = iter(_loader(shielded=True, persistent=persistent, method=method))
    first = next(batches)
    [worker] = batches._workers
    _send_from_another_process(worker.pid, signum)
    assert _alive_after(worker)
    later = [next(batches) for _ in range(3)]  # (the trainer's SIGCHLD check would raise here for a dead one)
    assert torch.equal(first, torch.tensor([0, 1])) and torch.equal(later[-1], torch.tensor([6, 7]))
    del batches


def test_workers_that_a_forkserver_would_start_start_by_spawn():
    """A forkserver (Linux's default from Python 3.14) forks its processes with the signal mask it started with,
    whatever the mask of the process that asks: its workers could not start shielded."""
    assert type(shielded_workers(1, "forkserver")["multiprocessing_context"]).__name__ == "ShieldedSpawnContext"
    assert type(shielded_workers(1, "fork")["multiprocessing_context"]).__name__ == "ShieldedForkContext"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_trainers_sigterm_still_ends_a_shielded_worker_with_status_0(method):
    """torch's clean-up terminates a worker that does not stop when asked; a status of 0 is what torch's own
    handler gives (another would be reported as a failed worker)."""
    batches = iter(_loader(shielded=True, method=method))
    next(batches)
    [worker] = batches._workers
    os.kill(worker.pid, signal.SIGTERM)
    assert not _alive_after(worker, 10) and worker.exitcode == 0


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_shielded_worker_ends_when_its_trainer_is_killed(method):
    """SIGKILL to the trainer (after SLURM's grace period, say): its workers do not outlive it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(f"""
        import time
        from tests.test_preemption import _loader
        if __name__ == "__main__":
            batches = iter(_loader(shielded=True, method={method!r}))
            next(batches)
            print(batches._workers[0].pid, flush=True)
            time.sleep(600)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root)
    worker = int(trainer.stdout.readline())
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        time.sleep(0.1)
    stat = open(f"/proc/{worker}/stat").read() if os.path.exists(f"/proc/{worker}") else ""
    assert not stat or stat.split(") ")[1].startswith("Z"), stat  # (gone, or a zombie nobody reaps)


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
    assert preemption.SHIELDED_SIGNALS == {signal.SIGTERM, signal.SIGINT}
